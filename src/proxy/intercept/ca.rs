//! The interception CA: read from `ca_cert_file`/`ca_key_file`, or created there when neither
//! exists, and what it may name.
//!
//! A CA bearerd creates is ECDSA P-256 with `basicConstraints` CA, path length 0, and a
//! critical Name Constraints extension (RFC 5280 §4.2.1.10) permitting only the routed hosts
//! as dNSName subtrees (`*.example.com` becomes the subtree `example.com`), and IP addresses
//! excluded entirely unless a route names one (then only those addresses). Its key is written
//! `0600` and never logged. A stolen key can then impersonate only the hosts bearerd already
//! holds tokens for, and only to apps that trust this CA.
//!
//! A CA brought by the operator is used as given (a WARN when it has no name constraints), but
//! a start or reload with a routed host the CA cannot name is refused: bearerd never re-mints a
//! CA the app has already loaded.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, GeneralSubtree, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, NameConstraints, PublicKeyData, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use zeroize::Zeroizing;

use crate::config;
use crate::files::{self, Content};

/// How long a CA bearerd creates is valid: five years. It is meant to live as long as its
/// key's volume (a pod, a machine); its name constraints, not its expiry, bound what a stolen
/// key can do.
pub(crate) const CREATED_CA_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 60 * 60);

/// The subject common name of a CA bearerd creates.
const CREATED_CA_NAME: &str = "bearerd interception CA";

/// The CA could not be read, checked or created. Never holds key material.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CaError {
    /// A file could not be read.
    #[error(transparent)]
    Read(#[from] files::FileError),
    /// One of the two files exists and the other does not: bearerd creates both or neither.
    #[error("{} exists but {} does not: bring both files, or remove both for bearerd to create a CA", present.display(), missing.display())]
    OnlyOne {
        /// The file that exists.
        present: PathBuf,
        /// The file that does not.
        missing: PathBuf,
    },
    /// The certificate or key is not what it must be.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file at fault.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The files could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS's error.
        source: std::io::Error,
    },
    /// rcgen refused to build a certificate.
    #[error("cannot create the CA: {0}")]
    Mint(String),
}

/// What a CA may name: its Name Constraints, read from the certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Constraints {
    /// Whether the extension is marked critical.
    pub critical: bool,
    /// Permitted dNSName subtrees (lowercase, no leading dot).
    pub permitted_dns: Vec<String>,
    /// Excluded dNSName subtrees.
    pub excluded_dns: Vec<String>,
    /// Permitted iPAddress ranges.
    pub permitted_ip: Vec<ipnet::IpNet>,
    /// Excluded iPAddress ranges.
    pub excluded_ip: Vec<ipnet::IpNet>,
}

impl Constraints {
    /// Whether a certificate for `host` (a DNS name, or an IP address without brackets) is
    /// within these constraints (RFC 5280 §4.2.1.10: a dNSName subtree is the name and every
    /// name below it; with no permitted subtree of a name's type, any name of it is permitted).
    pub(crate) fn permits(&self, host: &str) -> bool {
        match host.parse::<IpAddr>() {
            Ok(ip) => {
                let ip = ip.to_canonical();
                !self.excluded_ip.iter().any(|net| net.contains(&ip))
                    && (self.permitted_ip.is_empty()
                        || self.permitted_ip.iter().any(|net| net.contains(&ip)))
            }
            Err(_) => {
                let host = host.trim_end_matches('.');
                !self.excluded_dns.iter().any(|tree| in_subtree(host, tree))
                    && (self.permitted_dns.is_empty()
                        || self.permitted_dns.iter().any(|tree| in_subtree(host, tree)))
            }
        }
    }

    /// The constraints as `--check` prints them.
    pub(crate) fn describe(&self) -> String {
        let mut out = String::new();
        let list = |names: Vec<String>| {
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        };
        let permitted: Vec<String> = self
            .permitted_dns
            .iter()
            .cloned()
            .chain(self.permitted_ip.iter().map(ToString::to_string))
            .collect();
        let excluded: Vec<String> = self
            .excluded_dns
            .iter()
            .cloned()
            .chain(self.excluded_ip.iter().map(ToString::to_string))
            .collect();
        let _ = write!(
            out,
            "{}permitted: {}; excluded: {}",
            if self.critical { "critical, " } else { "" },
            list(permitted),
            list(excluded)
        );
        out
    }
}

/// Whether `host` is `tree` or below it, ignoring case. A constraint written `.example.com`
/// (the form some tools use for "below only") is read as the subtree itself.
fn in_subtree(host: &str, tree: &str) -> bool {
    let tree = tree.trim_start_matches('.').trim_end_matches('.');
    if tree.is_empty() {
        return true;
    }
    host.len() >= tree.len() && {
        let (head, tail) = host.split_at(host.len() - tree.len());
        tail.eq_ignore_ascii_case(tree) && (head.is_empty() || head.ends_with('.'))
    }
}

/// What `--check` and `/status` say of a CA.
#[derive(Debug, Clone)]
pub(crate) struct Description {
    /// The subject, as RFC 4514 text.
    pub subject: String,
    /// SHA-256 of the certificate (DER), hex pairs joined by `:`.
    pub fingerprint: String,
    /// The end of its validity.
    pub not_after: SystemTime,
    /// Its Name Constraints; `None`: it may name anything.
    pub constraints: Option<Constraints>,
}

/// A CA ready to sign leaves.
pub(crate) struct Ca {
    /// The certificate, sent after each leaf.
    pub cert: CertificateDer<'static>,
    /// Its key and names, as rcgen signs with them.
    pub issuer: Issuer<'static, KeyPair>,
    /// What it is and may name.
    pub description: Description,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of every Debug print.
        f.debug_struct("Ca")
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

/// What the files hold now: a CA, or nothing yet (and whether one could be created).
#[derive(Debug)]
pub(crate) enum Found {
    /// Both files exist and make a CA.
    Ca(Box<Ca>),
    /// Neither exists: a start creates both; `Err` says why it could not write them.
    Absent(Result<(), String>),
}

/// Reads the CA of `settings`, or finds that there is none yet. Creates nothing (`--check`
/// runs this too).
pub(crate) fn find(settings: &config::Intercept) -> Result<Found, CaError> {
    let (cert_path, key_path) = (&settings.ca_cert_file, &settings.ca_key_file);
    match (exists(cert_path), exists(key_path)) {
        (true, true) => load(cert_path, key_path).map(|ca| Found::Ca(Box::new(ca))),
        (false, false) => Ok(Found::Absent(writable(cert_path).and(writable(key_path)))),
        (true, false) => Err(CaError::OnlyOne {
            present: cert_path.clone(),
            missing: key_path.clone(),
        }),
        (false, true) => Err(CaError::OnlyOne {
            present: key_path.clone(),
            missing: cert_path.clone(),
        }),
    }
}

fn exists(path: &Path) -> bool {
    // A dangling symlink counts: it is something the operator put there.
    std::fs::symlink_metadata(path).is_ok()
}

/// Whether a file can be created at `path`: its directory exists and is writable.
fn writable(path: &Path) -> Result<(), String> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    #[cfg(unix)]
    {
        rustix::fs::access(dir, rustix::fs::Access::WRITE_OK)
            .map_err(|e| format!("directory {} is not writable: {e}", dir.display()))
    }
    #[cfg(not(unix))]
    {
        std::fs::metadata(dir)
            .map(|_| ())
            .map_err(|e| format!("directory {}: {e}", dir.display()))
    }
}

/// Reads and checks a CA: a certificate that is a CA, still valid, and the key that matches.
pub(crate) fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, CaError> {
    let invalid = |path: &Path, reason: String| CaError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let pem = files::read_sync(cert_path, Content::Certificate)?;
    let cert = CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| invalid(cert_path, "holds no PEM certificate".into()))?
        .map_err(|e| invalid(cert_path, e.to_string()))?;
    let description = describe(&cert).map_err(|reason| invalid(cert_path, reason))?;
    let key_pem = files::read_sync(key_path, Content::Key)?;
    let key_text =
        std::str::from_utf8(&key_pem).map_err(|_| invalid(key_path, "is not PEM text".into()))?;
    // rcgen's message names the format, never the key.
    let key = KeyPair::from_pem(key_text)
        .map_err(|e| invalid(key_path, format!("is not a usable private key: {e}")))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
        .map_err(|e| invalid(cert_path, e.to_string()))?;
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(invalid(
            key_path,
            format!("is not the key of {}", cert_path.display()),
        ));
    }
    let issuer = Issuer::from_ca_cert_der(&cert, key)
        .map_err(|e| invalid(cert_path, format!("cannot sign with it: {e}")))?;
    Ok(Ca {
        cert,
        issuer,
        description,
    })
}

/// Subject, fingerprint, expiry and constraints of a CA certificate; an error when it is not
/// a CA or has expired.
fn describe(cert: &CertificateDer<'_>) -> Result<Description, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| e.to_string())?;
    let is_ca = parsed
        .basic_constraints()
        .map_err(|e| e.to_string())?
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err("is not a CA certificate (basicConstraints CA is not set)".into());
    }
    let not_after_unix = parsed.validity().not_after.timestamp();
    let not_after = u64::try_from(not_after_unix)
        .ok()
        .and_then(|secs| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if not_after <= SystemTime::now() {
        return Err(format!(
            "expired at {}",
            humantime::format_rfc3339_seconds(not_after)
        ));
    }
    let constraints = match parsed.name_constraints().map_err(|e| e.to_string())? {
        None => None,
        Some(ext) => {
            let mut read = Constraints {
                critical: ext.critical,
                ..Constraints::default()
            };
            for (subtrees, dns, ip) in [
                (
                    &ext.value.permitted_subtrees,
                    &mut read.permitted_dns,
                    &mut read.permitted_ip,
                ),
                (
                    &ext.value.excluded_subtrees,
                    &mut read.excluded_dns,
                    &mut read.excluded_ip,
                ),
            ] {
                for subtree in subtrees.iter().flatten() {
                    match &subtree.base {
                        GeneralName::DNSName(name) => dns.push(name.to_ascii_lowercase()),
                        GeneralName::IPAddress(bytes) => ip.push(ip_range(bytes)?),
                        // Other name types (email, URI, directory) do not constrain a
                        // server's DNS or IP name.
                        _ => {}
                    }
                }
            }
            Some(read)
        }
    };
    Ok(Description {
        subject: parsed.subject().to_string(),
        fingerprint: fingerprint(cert),
        not_after,
        constraints,
    })
}

/// An iPAddress subtree: the address then its mask (RFC 5280 §4.2.1.10), 8 or 32 bytes.
fn ip_range(bytes: &[u8]) -> Result<ipnet::IpNet, String> {
    let bad = || "has an iPAddress name constraint that is not an address and mask".to_owned();
    let (addr, mask): (IpAddr, IpAddr) = match bytes.len() {
        8 => {
            let (a, m) = bytes.split_at(4);
            let a: [u8; 4] = a.try_into().map_err(|_| bad())?;
            let m: [u8; 4] = m.try_into().map_err(|_| bad())?;
            (a.into(), m.into())
        }
        32 => {
            let (a, m) = bytes.split_at(16);
            let a: [u8; 16] = a.try_into().map_err(|_| bad())?;
            let m: [u8; 16] = m.try_into().map_err(|_| bad())?;
            (a.into(), m.into())
        }
        _ => return Err(bad()),
    };
    ipnet::IpNet::with_netmask(addr, mask).map_err(|_| bad())
}

/// SHA-256 of the DER, as `AB:CD:…`.
pub(crate) fn fingerprint(cert: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert);
    let mut out = String::with_capacity(95);
    for (i, byte) in digest.as_ref().iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        let _ = write!(out, "{byte:02X}");
    }
    out
}

/// The routed hosts (route `host` values: a name, `*.name`, or an address) the CA cannot
/// name. A wildcard route needs the whole subtree: its base name must be permitted.
pub(crate) fn cannot_name<'a>(
    description: &Description,
    hosts: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let Some(constraints) = &description.constraints else {
        return Vec::new();
    };
    hosts
        .into_iter()
        .filter(|host| !constraints.permits(bare(host)))
        .map(str::to_owned)
        .collect()
}

/// A route host as a certificate names it: no `*.`, no port, no IPv6 brackets.
fn bare(host: &str) -> &str {
    let host = host.strip_prefix("*.").unwrap_or(host);
    match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => host.split(':').next().unwrap_or(host),
    }
}

/// The Name Constraints of a CA created for `hosts`.
fn constraints_for<'a>(hosts: impl IntoIterator<Item = &'a str>) -> NameConstraints {
    let mut permitted = Vec::new();
    let mut any_ip = false;
    for host in hosts {
        let host = bare(host);
        match host.parse::<IpAddr>() {
            Ok(ip) => {
                any_ip = true;
                let net = ipnet::IpNet::from(ip);
                permitted.push(GeneralSubtree::IpAddress(
                    rcgen::CidrSubnet::from_addr_prefix(net.addr(), net.prefix_len()),
                ));
            }
            Err(_) => {
                let name = GeneralSubtree::DnsName(host.to_ascii_lowercase());
                if !permitted.contains(&name) {
                    permitted.push(name);
                }
            }
        }
    }
    let excluded = if any_ip {
        Vec::new()
    } else {
        vec![
            GeneralSubtree::IpAddress(rcgen::CidrSubnet::V4([0; 4], [0; 4])),
            GeneralSubtree::IpAddress(rcgen::CidrSubnet::V6([0; 16], [0; 16])),
        ]
    };
    NameConstraints {
        permitted_subtrees: permitted,
        excluded_subtrees: excluded,
    }
}

/// Creates a CA for `hosts` and writes it to the files of `settings` (the key `0600`, created
/// new: an existing file is never overwritten).
pub(crate) fn create<'a>(
    settings: &config::Intercept,
    hosts: impl IntoIterator<Item = &'a str>,
) -> Result<Ca, CaError> {
    let mint = |e: rcgen::Error| CaError::Mint(e.to_string());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(mint)?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CREATED_CA_NAME);
    name.push(DnType::OrganizationName, "bearerd");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.name_constraints = Some(constraints_for(hosts));
    let now = SystemTime::now();
    // An hour back, for clocks of apps a little behind bearerd's.
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + CREATED_CA_VALIDITY).into();
    params.serial_number = Some(serial());
    let cert = params.self_signed(&key).map_err(mint)?;
    let key_pem = Zeroizing::new(key.serialize_pem());
    write_new(&settings.ca_key_file, key_pem.as_bytes(), 0o600)?;
    write_new(&settings.ca_cert_file, cert.pem().as_bytes(), 0o644)?;
    let der = cert.der().clone();
    let description = describe(&der).map_err(CaError::Mint)?;
    let issuer = Issuer::new(params, key);
    Ok(Ca {
        cert: der,
        issuer,
        description,
    })
}

/// A random positive serial of 16 bytes (RFC 5280 §4.1.2.2: at most 20, positive).
pub(crate) fn serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    for byte in &mut bytes {
        *byte = fastrand::u8(..);
    }
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Writes `contents` to a new file at `path` with `mode`: an existing file is an error, never
/// overwritten.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let failed = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(failed)?;
    file.write_all(contents).map_err(failed)?;
    file.sync_all().map_err(failed)
}

/// Writes the bundle an app whose CA setting replaces the system store needs: the system's
/// roots and then the CA, as PEM. Replaced whole (written beside and renamed), so an app never
/// reads half of one. Returns how many system roots went in.
pub(crate) fn write_bundle(path: &Path, ca: &CertificateDer<'_>) -> Result<usize, CaError> {
    let failed = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let native = rustls_native_certs::load_native_certs();
    let mut out = String::new();
    let mut roots = 0;
    for cert in &native.certs {
        pem_into(&mut out, cert);
        roots += 1;
    }
    pem_into(&mut out, ca);
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".new");
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    write_new(&temporary, out.as_bytes(), 0o644)?;
    std::fs::rename(&temporary, path).map_err(failed)?;
    Ok(roots)
}

/// Appends `cert` to `out` as a PEM block.
fn pem_into(out: &mut String, cert: &[u8]) {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(cert);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> config::Intercept {
        config::Intercept {
            ca_cert_file: dir.join("ca.pem"),
            ca_key_file: dir.join("ca.key"),
            ca_bundle_file: None,
            passthrough: Vec::new(),
            handshake_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn a_created_ca_names_the_routed_hosts_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings(dir.path());
        assert!(matches!(find(&settings).unwrap(), Found::Absent(Ok(()))));
        let ca = create(&settings, ["api.example", "*.vendor.example"]).unwrap();
        let constraints = ca.description.constraints.clone().unwrap();
        assert!(constraints.critical);
        assert_eq!(constraints.permitted_dns, ["api.example", "vendor.example"]);
        assert!(constraints.permits("api.example"));
        assert!(constraints.permits("a.vendor.example"));
        assert!(!constraints.permits("other.example"));
        assert!(!constraints.permits("127.0.0.1"));
        assert!(!constraints.permits("::1"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&settings.ca_key_file)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Read back as a brought CA: the same certificate, and it cannot be created again.
        let Found::Ca(loaded) = find(&settings).unwrap() else {
            panic!("the CA just written was not found");
        };
        assert_eq!(loaded.description.fingerprint, ca.description.fingerprint);
        assert!(matches!(
            create(&settings, ["api.example"]),
            Err(CaError::Write { .. })
        ));
        assert_eq!(
            cannot_name(
                &loaded.description,
                ["api.example", "evil.example", "10.0.0.1"]
            ),
            ["evil.example", "10.0.0.1"]
        );
        assert!(!format!("{loaded:?}").contains("PRIVATE"));
    }

    #[test]
    fn a_route_host_is_named_without_its_port() {
        assert_eq!(bare("api.example:8443"), "api.example");
        assert_eq!(bare("[::1]:8443"), "::1");
        assert_eq!(bare("[::1]"), "::1");
        assert_eq!(bare("*.example.com"), "example.com");
    }

    #[test]
    fn a_routed_address_is_permitted_alone() {
        let constraints = constraints_for(["10.1.2.3", "api.example"]);
        assert!(constraints.excluded_subtrees.is_empty());
        assert_eq!(constraints.permitted_subtrees.len(), 2);
    }

    #[test]
    fn one_file_without_the_other_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings(dir.path());
        std::fs::write(&settings.ca_cert_file, "x").unwrap();
        assert!(matches!(find(&settings), Err(CaError::OnlyOne { .. })));
    }

    #[test]
    fn subtrees_follow_rfc_5280() {
        assert!(in_subtree("api.example", "api.example"));
        assert!(in_subtree("a.api.example", "api.example"));
        assert!(in_subtree("A.API.example", ".api.example"));
        assert!(!in_subtree("badapi.example", "api.example"));
        assert!(!in_subtree("example", "api.example"));
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings(dir.path());
        create(&settings, ["api.example"]).unwrap();
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::remove_file(&settings.ca_key_file).unwrap();
        std::fs::write(&settings.ca_key_file, other.serialize_pem()).unwrap();
        let error = load(&settings.ca_cert_file, &settings.ca_key_file).unwrap_err();
        assert!(error.to_string().contains("is not the key of"), "{error}");
        assert!(!error.to_string().contains("PRIVATE"));
    }
}
