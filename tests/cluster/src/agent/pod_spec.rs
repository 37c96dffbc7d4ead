//! What a pod's spec means on this machine, as pure functions: each container's environment
//! (`value`, `valueFrom` secretKeyRef / configMapKeyRef / fieldRef, `envFrom`, `$(VAR)`
//! expansion), the files of its volumes, and where they are mounted. The I/O (fetching the
//! Secrets and ConfigMaps, writing files) is the pod worker's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, KeyToPath, ObjectFieldSelector, Pod, SecretVolumeSource,
};

use super::exec::Bind;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("{kind} {name:?} not found")]
    Missing { kind: &'static str, name: String },
    #[error("key {key:?} not found in {kind} {name:?}")]
    MissingKey {
        kind: &'static str,
        name: String,
        key: String,
    },
    #[error("{0} is not supported by the local node agent")]
    Unsupported(String),
    #[error("invalid {0}")]
    Invalid(String),
}

/// The Secrets and ConfigMaps of the pod's namespace that the pod refers to; absent = not found.
#[derive(Debug, Default, Clone)]
pub struct Lookups {
    pub config_maps: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    pub secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

/// Facts about the running pod that its spec can refer to.
#[derive(Debug, Clone)]
pub struct PodFacts {
    pub pod_ip: String,
    pub host_ip: String,
    pub node_name: String,
    pub gpus: Vec<u32>,
    pub api_host: String,
    pub api_port: u16,
}

/// Names of every ConfigMap and Secret the pod refers to: (config maps, secrets).
pub fn referenced(pod: &Pod) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut cms, mut secrets) = (BTreeSet::new(), BTreeSet::new());
    let Some(spec) = &pod.spec else {
        return (cms, secrets);
    };
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for e in c.env.iter().flatten() {
            if let Some(vf) = &e.value_from {
                if let Some(r) = &vf.config_map_key_ref {
                    cms.insert(r.name.clone());
                }
                if let Some(r) = &vf.secret_key_ref {
                    secrets.insert(r.name.clone());
                }
            }
        }
        for ef in c.env_from.iter().flatten() {
            if let Some(r) = &ef.config_map_ref {
                cms.insert(r.name.clone());
            }
            if let Some(r) = &ef.secret_ref {
                secrets.insert(r.name.clone());
            }
        }
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(cm) = &v.config_map {
            cms.insert(cm.name.clone());
        }
        if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            secrets.insert(s);
        }
        for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(cm) = &src.config_map {
                cms.insert(cm.name.clone());
            }
            if let Some(s) = &src.secret {
                secrets.insert(s.name.clone());
            }
        }
    }
    (cms, secrets)
}

fn lookup<'a>(
    maps: &'a BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    kind: &'static str,
    name: &str,
    key: &str,
    optional: bool,
) -> Result<Option<&'a [u8]>, SpecError> {
    match maps.get(name) {
        None if optional => Ok(None),
        None => Err(SpecError::Missing {
            kind,
            name: name.into(),
        }),
        Some(m) => match m.get(key) {
            Some(v) => Ok(Some(v)),
            None if optional => Ok(None),
            None => Err(SpecError::MissingKey {
                kind,
                name: name.into(),
                key: key.into(),
            }),
        },
    }
}

/// The value of a downward-API field path.
pub fn field_value(
    pod: &Pod,
    facts: &PodFacts,
    sel: &ObjectFieldSelector,
) -> Result<String, SpecError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let path = sel.field_path.as_str();
    let from_map = |m: &Option<BTreeMap<String, String>>, prefix: &str| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(
            m.as_ref()
                .and_then(|m| m.get(key))
                .cloned()
                .unwrap_or_default(),
        )
    };
    let v = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => facts.node_name.clone(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => facts.pod_ip.clone(),
        "status.hostIP" => facts.host_ip.clone(),
        _ => from_map(&meta.labels, "metadata.labels['")
            .or_else(|| from_map(&meta.annotations, "metadata.annotations['"))
            .ok_or_else(|| SpecError::Unsupported(format!("fieldRef {path:?}")))?,
    };
    Ok(v)
}

/// Kubernetes' `$(VAR)` expansion: references to defined variables are replaced, `$$` escapes,
/// anything else is left as written.
pub fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.get(name) {
                        Some(v) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment, in the order a runtime and kubelet build it: defaults (PATH,
/// HOSTNAME, service discovery for the API server), the image's ENV, `envFrom`, `env` (later
/// wins), then the GPUs.
pub fn container_env(
    pod: &Pod,
    c: &Container,
    image_env: &BTreeMap<String, String>,
    facts: &PodFacts,
    lookups: &Lookups,
) -> Result<Vec<(String, String)>, SpecError> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut set = |env: &mut BTreeMap<String, String>, k: String, v: String| {
        if !env.contains_key(&k) {
            order.push(k.clone());
        }
        env.insert(k, v);
    };
    let host = &facts.api_host;
    let port = facts.api_port;
    for (k, v) in [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        ),
        ("HOSTNAME", pod.metadata.name.clone().unwrap_or_default()),
        ("HOME", "/".to_string()),
        ("KUBERNETES_SERVICE_HOST", host.clone()),
        ("KUBERNETES_SERVICE_PORT", port.to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS", port.to_string()),
        ("KUBERNETES_PORT", format!("tcp://{host}:{port}")),
    ] {
        set(&mut env, k.to_string(), v);
    }
    for (k, v) in image_env {
        set(&mut env, k.clone(), v.clone());
    }
    for ef in c.env_from.iter().flatten() {
        let prefix = ef.prefix.clone().unwrap_or_default();
        let (maps, kind, name, optional) = if let Some(r) = &ef.config_map_ref {
            (
                &lookups.config_maps,
                "ConfigMap",
                &r.name,
                r.optional.unwrap_or(false),
            )
        } else if let Some(r) = &ef.secret_ref {
            (
                &lookups.secrets,
                "Secret",
                &r.name,
                r.optional.unwrap_or(false),
            )
        } else {
            continue;
        };
        match maps.get(name) {
            Some(m) => {
                for (k, v) in m {
                    set(
                        &mut env,
                        format!("{prefix}{k}"),
                        String::from_utf8_lossy(v).into(),
                    );
                }
            }
            None if optional => {}
            None => {
                return Err(SpecError::Missing {
                    kind,
                    name: name.clone(),
                })
            }
        }
    }
    for e in c.env.iter().flatten() {
        let v = match &e.value_from {
            None => Some(expand(e.value.as_deref().unwrap_or(""), &env)),
            Some(vf) => {
                if let Some(r) = &vf.config_map_key_ref {
                    lookup(
                        &lookups.config_maps,
                        "ConfigMap",
                        &r.name,
                        &r.key,
                        r.optional.unwrap_or(false),
                    )?
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                } else if let Some(r) = &vf.secret_key_ref {
                    lookup(
                        &lookups.secrets,
                        "Secret",
                        &r.name,
                        &r.key,
                        r.optional.unwrap_or(false),
                    )?
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                } else if let Some(f) = &vf.field_ref {
                    Some(field_value(pod, facts, f)?)
                } else {
                    return Err(SpecError::Unsupported(format!(
                        "env {:?}: resourceFieldRef",
                        e.name
                    )));
                }
            }
        };
        if let Some(v) = v {
            set(&mut env, e.name.clone(), v);
        }
    }
    if !facts.gpus.is_empty() {
        let ids: Vec<String> = facts.gpus.iter().map(u32::to_string).collect();
        set(&mut env, "NVIDIA_VISIBLE_DEVICES".into(), ids.join(","));
    }
    Ok(order
        .into_iter()
        .map(|k| {
            let v = env[&k].clone();
            (k, v)
        })
        .collect())
}

/// What a volume holds: files (relative path -> bytes, mode) or an empty writable directory.
#[derive(Debug, Clone, PartialEq)]
pub enum VolumeContent {
    Files(BTreeMap<PathBuf, (Vec<u8>, u32)>),
    EmptyDir,
}

fn checked_rel(p: &str) -> Result<PathBuf, SpecError> {
    let path = Path::new(p);
    if p.is_empty()
        || path
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(SpecError::Invalid(format!("volume item path {p:?}")));
    }
    Ok(path.into())
}

fn project(
    data: Option<&BTreeMap<String, Vec<u8>>>,
    items: &Option<Vec<KeyToPath>>,
    mode: u32,
    what: (&'static str, &str),
    optional: bool,
    files: &mut BTreeMap<PathBuf, (Vec<u8>, u32)>,
) -> Result<(), SpecError> {
    let Some(data) = data else {
        return if optional {
            Ok(())
        } else {
            Err(SpecError::Missing {
                kind: what.0,
                name: what.1.into(),
            })
        };
    };
    match items {
        None => {
            for (k, v) in data {
                files.insert(checked_rel(k)?, (v.clone(), mode));
            }
        }
        Some(items) => {
            for it in items {
                let Some(v) = data.get(&it.key) else {
                    if optional {
                        continue;
                    }
                    return Err(SpecError::MissingKey {
                        kind: what.0,
                        name: what.1.into(),
                        key: it.key.clone(),
                    });
                };
                let m = it.mode.map_or(mode, |m| m as u32);
                files.insert(checked_rel(&it.path)?, (v.clone(), m));
            }
        }
    }
    Ok(())
}

/// Downward-API items (fieldRef only) as files.
fn downward_files(
    pod: &Pod,
    facts: &PodFacts,
    items: Option<&[k8s_openapi::api::core::v1::DownwardAPIVolumeFile]>,
    mode: u32,
    files: &mut BTreeMap<PathBuf, (Vec<u8>, u32)>,
) -> Result<(), SpecError> {
    for it in items.unwrap_or_default() {
        let f = it
            .field_ref
            .as_ref()
            .ok_or_else(|| SpecError::Unsupported("downwardAPI resourceFieldRef".into()))?;
        let m = it.mode.map_or(mode, |m| m as u32);
        files.insert(
            checked_rel(&it.path)?,
            (field_value(pod, facts, f)?.into_bytes(), m),
        );
    }
    Ok(())
}

/// The contents of every volume of the pod.
pub fn volume_contents(
    pod: &Pod,
    facts: &PodFacts,
    lookups: &Lookups,
) -> Result<BTreeMap<String, VolumeContent>, SpecError> {
    let mut out = BTreeMap::new();
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let mut files = BTreeMap::new();
        let content = if let Some(SecretVolumeSource {
            secret_name,
            items,
            default_mode,
            optional,
        }) = &v.secret
        {
            let name = secret_name.clone().unwrap_or_default();
            let mode = default_mode.map_or(0o644, |m| m as u32);
            project(
                lookups.secrets.get(&name),
                items,
                mode,
                ("Secret", &name),
                optional.unwrap_or(false),
                &mut files,
            )?;
            VolumeContent::Files(files)
        } else if let Some(ConfigMapVolumeSource {
            name,
            items,
            default_mode,
            optional,
        }) = &v.config_map
        {
            let mode = default_mode.map_or(0o644, |m| m as u32);
            project(
                lookups.config_maps.get(name),
                items,
                mode,
                ("ConfigMap", name),
                optional.unwrap_or(false),
                &mut files,
            )?;
            VolumeContent::Files(files)
        } else if v.empty_dir.is_some() {
            VolumeContent::EmptyDir
        } else if let Some(p) = &v.projected {
            let mode = p.default_mode.map_or(0o644, |m| m as u32);
            for src in p.sources.iter().flatten() {
                if let Some(s) = &src.secret {
                    project(
                        lookups.secrets.get(&s.name),
                        &s.items,
                        mode,
                        ("Secret", &s.name),
                        s.optional.unwrap_or(false),
                        &mut files,
                    )?;
                } else if let Some(c) = &src.config_map {
                    project(
                        lookups.config_maps.get(&c.name),
                        &c.items,
                        mode,
                        ("ConfigMap", &c.name),
                        c.optional.unwrap_or(false),
                        &mut files,
                    )?;
                } else if let Some(d) = &src.downward_api {
                    downward_files(pod, facts, d.items.as_deref(), mode, &mut files)?;
                } else {
                    return Err(SpecError::Unsupported(format!(
                        "projected volume {:?} source (serviceAccountToken)",
                        v.name
                    )));
                }
            }
            VolumeContent::Files(files)
        } else if let Some(d) = &v.downward_api {
            let mode = d.default_mode.map_or(0o644, |m| m as u32);
            downward_files(pod, facts, d.items.as_deref(), mode, &mut files)?;
            VolumeContent::Files(files)
        } else {
            return Err(SpecError::Unsupported(format!(
                "volume {:?}'s type",
                v.name
            )));
        };
        out.insert(v.name.clone(), content);
    }
    Ok(out)
}

/// The container's bind mounts, given where each volume was materialized on this machine.
pub fn container_binds(
    c: &Container,
    volume_dirs: &BTreeMap<String, PathBuf>,
) -> Result<Vec<Bind>, SpecError> {
    let mut binds = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let dir = volume_dirs.get(&m.name).ok_or_else(|| {
            SpecError::Invalid(format!("volumeMount {:?}: no such volume", m.name))
        })?;
        let src = match m.sub_path.as_deref() {
            Some(sp) if !sp.is_empty() => dir.join(checked_rel(sp)?),
            _ => dir.clone(),
        };
        if !Path::new(&m.mount_path).is_absolute() {
            return Err(SpecError::Invalid(format!("mountPath {:?}", m.mount_path)));
        }
        binds.push(Bind {
            src,
            dst: m.mount_path.clone().into(),
            read_only: m.read_only.unwrap_or(false),
        });
    }
    Ok(binds)
}

/// `nvidia.com/gpu` the pod asks for (limits, as the device plugin reads them).
pub fn gpus_requested(pod: &Pod) -> usize {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .filter_map(|c| c.resources.as_ref()?.limits.as_ref()?.get("nvidia.com/gpu"))
        .filter_map(|q| q.0.parse::<usize>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn facts() -> PodFacts {
        PodFacts {
            pod_ip: "10.88.0.7".into(),
            host_ip: "10.88.0.1".into(),
            node_name: "gpu-node-a".into(),
            gpus: vec![1],
            api_host: "10.88.0.1".into(),
            api_port: 6443,
        }
    }

    const POD: &str = r#"
metadata: {name: p, namespace: ns, uid: u1, labels: {app: engine}}
spec:
  serviceAccountName: sa
  containers:
  - name: c
    image: x
    envFrom: [{configMapRef: {name: cm}, prefix: CM_}]
    env:
    - {name: A, value: "a-$(POD_NAME)-$$(X)"}
    - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: B, value: "$(POD_NAME)"}
    - {name: IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    - {name: APP, valueFrom: {fieldRef: {fieldPath: "metadata.labels['app']"}}}
    - {name: TOKEN, valueFrom: {secretKeyRef: {name: s, key: token}}}
    - {name: OPT, valueFrom: {secretKeyRef: {name: nope, key: k, optional: true}}}
    - {name: LEVEL, valueFrom: {configMapKeyRef: {name: cm, key: level}}}
    volumeMounts:
    - {name: cfg, mountPath: /etc/cfg, readOnly: true}
    - {name: tok, mountPath: /var/run/secrets/kubernetes.io/serviceaccount}
  volumes:
  - {name: cfg, configMap: {name: cm, items: [{key: level, path: sub/level.txt, mode: 256}]}}
  - {name: tok, secret: {secretName: s}}
  - {name: scratch, emptyDir: {}}
"#;

    fn lookups() -> Lookups {
        let mut l = Lookups::default();
        l.config_maps.insert(
            "cm".into(),
            [("level".to_string(), b"debug".to_vec())].into(),
        );
        l.secrets.insert(
            "s".into(),
            [
                ("token".to_string(), b"sekrit".to_vec()),
                ("ca.crt".to_string(), b"CA".to_vec()),
            ]
            .into(),
        );
        l
    }

    #[test]
    fn env_resolves_every_source_in_kubelet_order() {
        let p = pod(POD);
        let env: BTreeMap<_, _> = container_env(
            &p,
            &p.spec.as_ref().unwrap().containers[0],
            &[
                ("LEVEL".to_string(), "image".to_string()),
                ("IMG".to_string(), "x".to_string()),
            ]
            .into(),
            &facts(),
            &lookups(),
        )
        .unwrap()
        .into_iter()
        .collect();
        // A is defined before POD_NAME: no expansion yet; `$$` escapes.
        assert_eq!(env["A"], "a-$(POD_NAME)-$(X)");
        assert_eq!(env["B"], "p");
        assert_eq!(env["IP"], "10.88.0.7");
        assert_eq!(env["APP"], "engine");
        assert_eq!(env["TOKEN"], "sekrit");
        assert_eq!(
            env["LEVEL"], "debug",
            "the container's env overrides the image's"
        );
        assert_eq!(env["IMG"], "x");
        assert_eq!(env["CM_level"], "debug");
        assert!(!env.contains_key("OPT"));
        assert_eq!(env["KUBERNETES_SERVICE_HOST"], "10.88.0.1");
        assert_eq!(env["NVIDIA_VISIBLE_DEVICES"], "1");
        let (cms, secrets) = referenced(&p);
        assert_eq!(cms, ["cm".to_string()].into());
        assert_eq!(secrets, ["nope".to_string(), "s".to_string()].into());
    }

    #[test]
    fn missing_references_are_clear_errors() {
        let p = pod(POD);
        let mut l = lookups();
        l.secrets.remove("s");
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert_eq!(
            container_env(&p, c, &BTreeMap::new(), &facts(), &l),
            Err(SpecError::Missing {
                kind: "Secret",
                name: "s".into()
            })
        );
        assert!(matches!(
            volume_contents(&p, &facts(), &l),
            Err(SpecError::Missing { .. })
        ));
    }

    #[test]
    fn volumes_and_mounts() {
        let p = pod(POD);
        let v = volume_contents(&p, &facts(), &lookups()).unwrap();
        let VolumeContent::Files(cfg) = &v["cfg"] else {
            panic!()
        };
        assert_eq!(cfg[Path::new("sub/level.txt")], (b"debug".to_vec(), 0o400));
        let VolumeContent::Files(tok) = &v["tok"] else {
            panic!()
        };
        assert_eq!(tok.len(), 2);
        assert_eq!(v["scratch"], VolumeContent::EmptyDir);
        let dirs: BTreeMap<String, PathBuf> = v
            .keys()
            .map(|k| (k.clone(), PathBuf::from("/state").join(k)))
            .collect();
        let binds = container_binds(&p.spec.as_ref().unwrap().containers[0], &dirs).unwrap();
        assert_eq!(binds[0].dst, Path::new("/etc/cfg"));
        assert!(binds[0].read_only);
        assert_eq!(binds[1].src, Path::new("/state/tok"));
    }

    #[test]
    fn item_paths_cannot_escape_the_volume() {
        let p = pod(&POD.replace("sub/level.txt", "../../etc/passwd"));
        assert!(matches!(
            volume_contents(&p, &facts(), &lookups()),
            Err(SpecError::Invalid(_))
        ));
    }

    proptest! {
        /// Text without `$` is unchanged; a defined `$(V)` is replaced; `$$` collapses to `$`.
        #[test]
        fn expansion(s in "[a-z ()]{0,20}", v in "[a-z]{0,5}") {
            let env: BTreeMap<String, String> = [("V".to_string(), v.clone())].into();
            prop_assert_eq!(expand(&s, &env), s.clone());
            prop_assert_eq!(expand(&format!("{s}$(V){s}"), &env), format!("{s}{v}{s}"));
            prop_assert_eq!(expand(&format!("$${s}"), &env), format!("${s}"));
            prop_assert_eq!(expand("$(W)", &env), "$(W)");
        }
    }
}
