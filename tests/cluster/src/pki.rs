//! The cluster's PKI: one CA, the API server's serving certificate, one client certificate per
//! identity (admin, controller-manager, scheduler, node agent), and the service-account key pair.
//! Fresh on every `up`; files are PEM, keys mode 0600.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A client identity: the certificate's CN is the user, O the groups.
pub struct Identity<'a> {
    pub file_stem: &'a str,
    pub user: &'a str,
    pub groups: &'a [&'a str],
}

pub const ADMIN: Identity<'static> = Identity {
    file_stem: "admin",
    user: "redline:admin",
    groups: &["system:masters"],
};
pub const CONTROLLER_MANAGER: Identity<'static> = Identity {
    file_stem: "controller-manager",
    user: "system:kube-controller-manager",
    groups: &[],
};
pub const SCHEDULER: Identity<'static> = Identity {
    file_stem: "scheduler",
    user: "system:kube-scheduler",
    groups: &[],
};
/// The node agent acts for all of its nodes; `up` binds this user to the `system:node` role.
pub const NODE_AGENT: Identity<'static> = Identity {
    file_stem: "node-agent",
    user: "redline:node-agent",
    groups: &[],
};
pub const CLIENTS: [Identity<'static>; 4] = [ADMIN, CONTROLLER_MANAGER, SCHEDULER, NODE_AGENT];

/// Writes `ca.{crt,key}`, `apiserver.{crt,key}`, `<identity>.{crt,key}` and `sa.{key,pub}` into
/// `dir`. `server_ips` are the API server's IP SANs (loopback and the address pods use).
pub fn generate(dir: &Path, server_ips: &[std::net::Ipv4Addr]) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.into(),
        source,
    })?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = dn("redline-cluster-ca", &[]);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    write(dir, "ca.crt", &ca_cert.pem(), false)?;
    write(dir, "ca.key", &ca_key.serialize_pem(), true)?;

    let mut sans: Vec<String> = server_ips.iter().map(|ip| ip.to_string()).collect();
    sans.extend(
        [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        .map(String::from),
    );
    // The first address of the service CIDR is the `kubernetes` Service's ClusterIP.
    sans.push("10.0.0.1".into());
    leaf(
        dir,
        "apiserver",
        CertificateParams::new(sans)?,
        "kube-apiserver",
        &[],
        ExtendedKeyUsagePurpose::ServerAuth,
        (&ca_cert, &ca_key),
    )?;
    for id in CLIENTS {
        leaf(
            dir,
            id.file_stem,
            CertificateParams::default(),
            id.user,
            id.groups,
            ExtendedKeyUsagePurpose::ClientAuth,
            (&ca_cert, &ca_key),
        )?;
    }
    let sa = KeyPair::generate()?;
    write(dir, "sa.key", &sa.serialize_pem(), true)?;
    write(dir, "sa.pub", &sa.public_key_pem(), false)?;
    Ok(())
}

fn leaf(
    dir: &Path,
    stem: &str,
    mut params: CertificateParams,
    cn: &str,
    groups: &[&str],
    usage: ExtendedKeyUsagePurpose,
    (ca_cert, ca_key): (&Certificate, &KeyPair),
) -> Result<(), PkiError> {
    let key = KeyPair::generate()?;
    params.distinguished_name = dn(cn, groups);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, ca_cert, ca_key)?;
    write(dir, &format!("{stem}.crt"), &cert.pem(), false)?;
    write(dir, &format!("{stem}.key"), &key.serialize_pem(), true)
}

fn dn(cn: &str, groups: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    for g in groups {
        dn.push(DnType::OrganizationName, *g);
    }
    dn
}

fn write(dir: &Path, name: &str, pem: &str, secret: bool) -> Result<(), PkiError> {
    let path = dir.join(name);
    let io = |source| PkiError::Io {
        path: path.clone(),
        source,
    };
    fs::write(&path, pem).map_err(io)?;
    let mode = if secret { 0o600 } else { 0o644 };
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(io)
}

/// A kubeconfig for `identity` against the API server at `server`, referring to the PKI files.
pub fn kubeconfig(pki: &Path, identity: &Identity, server: &str) -> String {
    let p = |f: String| pki.join(f).display().to_string();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: redline\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: redline\n  context:\n    cluster: redline\n    user: {user}\ncurrent-context: redline\n",
        ca = p("ca.crt".into()),
        user = identity.user,
        crt = p(format!("{}.crt", identity.file_stem)),
        key = p(format!("{}.key", identity.file_stem)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_file_and_keeps_keys_private() {
        let dir = std::env::temp_dir().join(format!("redline-pki-test-{}", std::process::id()));
        generate(&dir, &[[127, 0, 0, 1].into()]).unwrap();
        for f in [
            "ca.crt",
            "apiserver.crt",
            "admin.crt",
            "node-agent.key",
            "sa.pub",
        ] {
            assert!(dir.join(f).exists(), "{f}");
        }
        let mode = fs::metadata(dir.join("sa.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private key readable by others: {mode:o}");
        let kc = kubeconfig(&dir, &ADMIN, "https://127.0.0.1:6443");
        assert!(kc.contains("user: redline:admin") || kc.contains("name: redline:admin"));
        fs::remove_dir_all(dir).unwrap();
    }
}
