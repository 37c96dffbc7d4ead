//! The agent's configuration: which nodes it registers, and how it turns an image reference into
//! a program on this machine (there is no container runtime: an image names a local binary).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct AgentConfig {
    pub nodes: Vec<NodeConfig>,
    #[serde(default)]
    pub images: Vec<ImageConfig>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NodeConfig {
    pub name: String,
    #[serde(default)]
    pub gpus: u32,
    #[serde(default = "default_cpu")]
    pub cpu: String,
    #[serde(default = "default_memory")]
    pub memory: String,
    #[serde(default = "default_pods")]
    pub pods: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_cpu() -> String {
    "8".into()
}
fn default_memory() -> String {
    "32Gi".into()
}
fn default_pods() -> u32 {
    110
}

/// One image pattern (glob, e.g. `ghcr.io/redline/engine:*`) and what it runs. Its files are
/// "pulled" (hard-linked, else copied) into a world-readable image directory, `{image}`, so
/// that containers running as any user can read them.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageConfig {
    pub image: String,
    /// Path in the image directory -> file on this machine.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// The image's ENV.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The image directory (set at load).
    #[serde(skip)]
    pub dir: PathBuf,
    /// The image's ENTRYPOINT: the program (a path on this machine) and its fixed arguments.
    pub entrypoint: Vec<String>,
    /// The image's CMD: default arguments when the container gives no `args`.
    #[serde(default)]
    pub cmd: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ImageError {
    #[error("image {0:?} is not in the agent's image map")]
    Unknown(String),
    #[error("image {image:?} has an empty entrypoint")]
    EmptyEntrypoint { image: String },
    #[error("command {command:?} is not a program of image {image:?} (it runs {entrypoint:?})")]
    UnknownCommand {
        image: String,
        command: String,
        entrypoint: String,
    },
}

impl AgentConfig {
    /// Placeholders: `{bin}` (this build's binaries), `{models}` (the model cache, as the
    /// engine finds it), `{image}` (the image's directory under `images_dir`).
    pub fn load(path: &Path, bin_dir: &Path, images_dir: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Self::parse(&text, bin_dir, images_dir)
    }

    pub fn parse(text: &str, bin_dir: &Path, images_dir: &Path) -> anyhow::Result<Self> {
        let mut c: AgentConfig = serde_yaml::from_str(text)?;
        let bin = bin_dir.display().to_string();
        let models = model_cache_dir().display().to_string();
        for i in &mut c.images {
            let dir_name: String = i
                .image
                .chars()
                .map(|ch| {
                    if ch.is_ascii_alphanumeric() || ch == '.' || ch == '-' {
                        ch
                    } else {
                        '_'
                    }
                })
                .collect();
            i.dir = images_dir.join(dir_name);
            let image = i.dir.display().to_string();
            let sub = |a: &mut String| {
                *a = a
                    .replace("{bin}", &bin)
                    .replace("{models}", &models)
                    .replace("{image}", &image)
            };
            i.entrypoint
                .iter_mut()
                .chain(i.cmd.iter_mut())
                .for_each(sub);
            i.files.values_mut().for_each(sub);
            i.env.values_mut().for_each(sub);
            glob::Pattern::new(&i.image)
                .map_err(|e| anyhow::anyhow!("image pattern {:?}: {e}", i.image))?;
        }
        anyhow::ensure!(!c.nodes.is_empty(), "the agent config names no nodes");
        Ok(c)
    }

    /// The image-map entry an image reference matches.
    pub fn image(&self, image: &str) -> Result<&ImageConfig, ImageError> {
        self.images
            .iter()
            .find(|i| glob::Pattern::new(&i.image).is_ok_and(|p| p.matches(image)))
            .ok_or_else(|| ImageError::Unknown(image.into()))
    }
}

impl ImageConfig {
    /// Kubernetes' command/args semantics over the image's entrypoint/cmd: `command` replaces
    /// the entrypoint (its program must be the image's own, named by path or file name), `args`
    /// replaces cmd. Returns the program on this machine and its arguments.
    pub fn resolve(
        &self,
        command: &[String],
        args: Option<&[String]>,
    ) -> Result<(PathBuf, Vec<String>), ImageError> {
        let Some((program, fixed)) = self.entrypoint.split_first() else {
            return Err(ImageError::EmptyEntrypoint {
                image: self.image.clone(),
            });
        };
        let mut argv: Vec<String> = Vec::new();
        if let Some((cmd0, rest)) = command.split_first() {
            let name = |p: &str| Path::new(p).file_name().map(|f| f.to_owned());
            if name(cmd0) != name(program) {
                return Err(ImageError::UnknownCommand {
                    image: self.image.clone(),
                    command: cmd0.clone(),
                    entrypoint: program.clone(),
                });
            }
            argv.extend(rest.iter().cloned());
            argv.extend(args.unwrap_or_default().iter().cloned());
        } else {
            argv.extend(fixed.iter().cloned());
            argv.extend(args.unwrap_or(&self.cmd).iter().cloned());
        }
        Ok((PathBuf::from(program), argv))
    }

    /// Places the image's files in its directory (once; later calls find them there).
    pub fn pull(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::MetadataExt;
        use std::os::unix::fs::PermissionsExt;
        for (rel, src) in &self.files {
            let dst = self.dir.join(rel);
            let s = std::fs::metadata(src).map_err(|e| anyhow::anyhow!("image file {src}: {e}"))?;
            // Up to date: the same file (hard link), or a copy at least as new (a rebuilt
            // binary is a new file, so the next pod gets it, as a new image tag would).
            if let Ok(d) = std::fs::metadata(&dst) {
                let same = d.ino() == s.ino() && d.dev() == s.dev();
                if same || (d.len() == s.len() && d.mtime() >= s.mtime()) {
                    continue;
                }
            }
            let parent = dst.parent().unwrap_or(&self.dir);
            std::fs::create_dir_all(parent)?;
            // One name per pull: pods start in parallel, and with a name per process a pull
            // that found another's hard link to the source there copied onto it, truncating
            // the build's own binary (seen on a cold CI run: every test pod ran an empty file).
            static PULLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = PULLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = parent.join(format!(".pull-{}-{n}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            if std::fs::hard_link(src, &tmp).is_err() {
                // Another filesystem. The name is this pull's alone, so the copy cannot write
                // through someone else's link.
                std::fs::copy(src, &tmp).map_err(|e| anyhow::anyhow!("pulling {src}: {e}"))?;
            }
            std::fs::rename(&tmp, &dst)?;
        }
        // World-readable, as an image's filesystem is.
        let mut d = Some(self.dir.as_path());
        while let Some(p) = d {
            if !p.starts_with(self.dir.parent().unwrap_or(&self.dir)) {
                break;
            }
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
            d = p.parent();
        }
        Ok(())
    }
}

/// Where the engine looks for its default model (same rule as `redline-engine fetch-model`).
pub fn model_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("REDLINE_MODEL_CACHE") {
        return d.into();
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"))
        .join("redline/models")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AgentConfig {
        AgentConfig::parse(
            "nodes: [{name: a, gpus: 2}]\nimages:\n- image: 'ghcr.io/redline/engine:*'\n  entrypoint: ['{bin}/redline-engine', 'serve']\n  cmd: ['--port', '8000']\n",
            Path::new("/opt/target"),
            Path::new("/state/images"),
        )
        .unwrap()
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn kubernetes_command_and_args_semantics() {
        let c = config();
        let img = "ghcr.io/redline/engine:0.1";
        let prog = PathBuf::from("/opt/target/redline-engine");
        // Neither: entrypoint + cmd.
        assert_eq!(
            c.image(img).unwrap().resolve(&[], None).unwrap(),
            (prog.clone(), s(&["serve", "--port", "8000"]))
        );
        // args only: entrypoint + args.
        assert_eq!(
            c.image(img)
                .unwrap()
                .resolve(&[], Some(&s(&["--port", "9"])))
                .unwrap(),
            (prog.clone(), s(&["serve", "--port", "9"]))
        );
        // command: replaces the entrypoint and drops cmd.
        assert_eq!(
            c.image(img)
                .unwrap()
                .resolve(&s(&["/usr/local/bin/redline-engine", "bench"]), None)
                .unwrap(),
            (prog.clone(), s(&["bench"]))
        );
        assert_eq!(
            c.image(img)
                .unwrap()
                .resolve(&s(&["redline-engine"]), Some(&s(&["x"])))
                .unwrap(),
            (prog, s(&["x"]))
        );
    }

    /// Pods start in parallel and each pulls its image: the build's binary must come through
    /// every pull whole, and the image gets the same bytes.
    #[test]
    fn parallel_pulls_leave_the_source_whole() {
        let root = std::env::temp_dir().join(format!("rl-pull-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let src = root.join("redline-testpod");
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &bytes).unwrap();
        for round in 0..200 {
            let image = ImageConfig {
                image: "ghcr.io/redline/testpod:*".into(),
                files: [("redline-testpod".to_string(), src.display().to_string())].into(),
                env: BTreeMap::new(),
                dir: root.join(format!("images/{round}")),
                entrypoint: vec!["{image}/redline-testpod".into()],
                cmd: vec![],
            };
            let start = std::sync::Barrier::new(8);
            std::thread::scope(|t| {
                for _ in 0..8 {
                    t.spawn(|| {
                        start.wait();
                        // A lost race may fail a pull (the pod retries); it must not corrupt.
                        let _ = image.pull();
                    });
                }
            });
            assert_eq!(std::fs::read(&src).unwrap(), bytes, "round {round}: source");
            image.pull().unwrap();
            assert_eq!(
                std::fs::read(image.dir.join("redline-testpod")).unwrap(),
                bytes,
                "round {round}: image"
            );
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn unknown_images_and_commands_are_errors() {
        let c = config();
        assert_eq!(
            c.image("nginx:1").map(|_| ()),
            Err(ImageError::Unknown("nginx:1".into()))
        );
        assert!(matches!(
            c.image("ghcr.io/redline/engine:1")
                .unwrap()
                .resolve(&s(&["sh"]), None),
            Err(ImageError::UnknownCommand { .. })
        ));
    }
}
