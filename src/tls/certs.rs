//! Certificates: loading PEM pairs, choosing one per connection by SNI, and hot reload.
//!
//! A [`CertStore`] is an immutable snapshot built from every configured pair; it is only ever
//! swapped whole, so a reload that fails half-way leaves the previous snapshot serving. The
//! [`CertResolver`] plugged into rustls reads the current snapshot on each handshake;
//! established connections keep the `Arc<CertifiedKey>` they were handed, so a reload never
//! touches them.
//!
//! Names come from each leaf's own subjectAltName DNS entries (no CN fallback, as browsers
//! do): exact names first, then `*.suffix` wildcards (one label deep), then the first pair.
//!
//! Error messages name files, never print key bytes: PEM errors from a key file are reduced
//! to "invalid PEM", and rustls' key errors only describe the key type.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::config::CertPair;

/// Largest PEM file we read. Why: a full chain or a key is a few KiB; a larger file is a
/// mistake (wrong path), and reading it whole on every reload would waste memory.
pub const MAX_PEM_FILE_LEN: u64 = 1024 * 1024;

/// Why a set of certificates cannot be used. Every variant names the offending file.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The file could not be opened or read.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error (in the message, not a separate cause: one line per failure).
        error: std::io::Error,
    },
    /// The file is larger than [`MAX_PEM_FILE_LEN`].
    #[error("{} is larger than {MAX_PEM_FILE_LEN} bytes; not a PEM certificate or key", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The certificate file is not valid PEM.
    #[error("{}: invalid PEM certificate file: {reason}", path.display())]
    CertPem {
        /// The file.
        path: PathBuf,
        /// The PEM decoder's complaint (about certificate text, which is public).
        reason: String,
    },
    /// The certificate file holds no CERTIFICATE block.
    #[error("{}: no PEM certificate found", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The leaf certificate's DER does not parse.
    #[error("{}: cannot parse the leaf certificate: {reason}", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        reason: String,
    },
    /// The key file is not valid PEM or holds no private key. Deliberately no detail: the
    /// decoder's message could quote key text.
    #[error("{}: no valid PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) found", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The key parsed as PEM but rustls cannot use it.
    #[error("{}: unsupported private key: {reason}", path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// rustls' description (key type only, no key material).
        reason: String,
    },
    /// The key is not the one the leaf certificate was issued for.
    #[error("{} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// No pairs configured.
    #[error("no certificate configured")]
    Empty,
}

/// One loaded pair, with what we learned from it for logs.
struct Entry {
    /// The chain and signing key handed to rustls.
    key: Arc<CertifiedKey>,
    /// Certificate file, for logs.
    cert_path: PathBuf,
    /// DNS names from the leaf's subjectAltName (may include `*.` wildcards).
    names: Vec<String>,
}

/// An immutable snapshot of all certificates, indexed for SNI lookup.
pub struct CertStore {
    /// All pairs in configuration order; `entries[0]` is the default.
    entries: Vec<Entry>,
    /// Exact lower-case DNS name → index into `entries` (first pair wins on duplicates).
    exact: HashMap<String, usize>,
    /// For `*.example.com`, key `example.com` → index (first pair wins).
    wildcard: HashMap<String, usize>,
}

// Manual Debug: lists names only, never keys.
impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.entries
                    .iter()
                    .map(|e| (e.cert_path.display().to_string(), &e.names)),
            )
            .finish()
    }
}

impl CertStore {
    /// Loads every pair; any failure fails the whole store (the caller keeps the old one).
    pub fn load(pairs: &[CertPair], provider: &CryptoProvider) -> Result<CertStore, CertError> {
        if pairs.is_empty() {
            return Err(CertError::Empty);
        }
        let mut entries = Vec::with_capacity(pairs.len());
        for pair in pairs {
            entries.push(load_pair(pair, provider)?);
        }
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, entry) in entries.iter().enumerate() {
            for name in &entry.names {
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_owned()).or_insert(i),
                    None => exact.entry(name.clone()).or_insert(i),
                };
            }
        }
        Ok(CertStore {
            entries,
            exact,
            wildcard,
        })
    }

    /// The certificate for a client's SNI name (or the default).
    pub fn pick(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let index = sni.and_then(|name| self.lookup(name)).unwrap_or(0);
        &self.entries[index].key
    }

    fn lookup(&self, name: &str) -> Option<usize> {
        let name = name.strip_suffix('.').unwrap_or(name);
        // rustls already validated SNI as a DNS name; only case needs normalising, and most
        // clients send lower case, so avoid allocating then.
        let lowered;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = name.to_ascii_lowercase();
            lowered.as_str()
        } else {
            name
        };
        if let Some(&i) = self.exact.get(name) {
            return Some(i);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).copied()
    }

    /// One line per pair for logs: "path [names]".
    pub fn describe(&self) -> String {
        self.entries
            .iter()
            .map(|e| format!("{} [{}]", e.cert_path.display(), e.names.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn load_pair(pair: &CertPair, provider: &CryptoProvider) -> Result<Entry, CertError> {
    let cert_pem = read_capped(&pair.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::CertPem {
            path: pair.cert.clone(),
            reason: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate {
            path: pair.cert.clone(),
        });
    };
    let names = leaf_dns_names(leaf).map_err(|reason| CertError::BadCertificate {
        path: pair.cert.clone(),
        reason,
    })?;

    let key_pem = read_capped(&pair.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| CertError::NoKey {
        path: pair.key.clone(),
    })?;
    drop(key_pem);
    let signing_key =
        provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| CertError::BadKey {
                path: pair.key.clone(),
                reason: e.to_string(),
            })?;
    let certified = CertifiedKey::new(chain, signing_key);
    // Strict: every key type the ring provider loads can report its public key, so
    // "unknown" would itself be a surprise worth refusing.
    certified.keys_match().map_err(|_| CertError::KeyMismatch {
        cert: pair.cert.clone(),
        key: pair.key.clone(),
    })?;
    Ok(Entry {
        key: Arc::new(certified),
        cert_path: pair.cert.clone(),
        names,
    })
}

/// DNS names (lower case) from the leaf's subjectAltName extension.
fn leaf_dns_names(leaf: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("{e:?}"))?;
    Ok(cert
        .valid_dns_names()
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
        .collect())
}

fn read_capped(path: &Path) -> Result<Vec<u8>, CertError> {
    let read_err = |error| CertError::Read {
        path: path.to_owned(),
        error,
    };
    let file = fs::File::open(path).map_err(read_err)?;
    let mut buf = Vec::new();
    file.take(MAX_PEM_FILE_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(read_err)?;
    if buf.len() as u64 > MAX_PEM_FILE_LEN {
        return Err(CertError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(buf)
}

/// The rustls hook: answers each ClientHello from the current [`CertStore`].
#[derive(Debug)]
pub struct CertResolver {
    /// Swapped whole on reload; readers clone the `Arc` and release the lock at once.
    current: RwLock<Arc<CertStore>>,
}

impl CertResolver {
    /// A resolver serving `store` until the next [`CertResolver::replace`].
    pub fn new(store: CertStore) -> Self {
        CertResolver {
            current: RwLock::new(Arc::new(store)),
        }
    }

    /// The snapshot in use.
    pub fn current(&self) -> Arc<CertStore> {
        // A panic while holding the lock cannot leave a half-written Arc; keep serving.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Installs a new snapshot for future handshakes.
    pub fn replace(&self, store: CertStore) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(store);
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current().pick(client_hello.server_name()).clone())
    }
}

/// What identifies a file's content cheaply: a rename (certbot, `mv` of a new file), an
/// in-place rewrite, or a symlink flip all change at least one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    /// Device of the (symlink-resolved) file.
    dev: u64,
    /// Inode: changes on replace-by-rename even when the mtime is preserved.
    ino: u64,
    /// Size in bytes.
    len: u64,
    /// Modification time, seconds.
    mtime: i64,
    /// Modification time, nanoseconds part.
    mtime_nsec: i64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let m = fs::metadata(path).ok()?;
    Some(FileStamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    })
}

/// Outcome of [`CertReloader::reload`].
#[derive(Debug)]
pub enum Reload {
    /// Nothing changed on disk since the last attempt (and it was not forced).
    Unchanged,
    /// A new store is serving; the string describes it.
    Replaced(String),
}

/// Watches the configured files and rebuilds the resolver's store when they change.
pub struct CertReloader {
    /// The configured pairs, in order.
    pairs: Vec<CertPair>,
    /// Stamps of every cert and key file at the last attempt, to detect changes.
    stamps: Vec<Option<FileStamp>>,
    /// Where new stores are installed.
    resolver: Arc<CertResolver>,
    /// The crypto provider used to load keys.
    provider: Arc<CryptoProvider>,
}

impl CertReloader {
    /// `resolver` must already serve the store loaded from `pairs`.
    pub fn new(
        pairs: Vec<CertPair>,
        resolver: Arc<CertResolver>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        let stamps = Self::stamps_of(&pairs);
        CertReloader {
            pairs,
            stamps,
            resolver,
            provider,
        }
    }

    fn stamps_of(pairs: &[CertPair]) -> Vec<Option<FileStamp>> {
        pairs
            .iter()
            .flat_map(|p| [stamp(&p.cert), stamp(&p.key)])
            .collect()
    }

    /// Rebuilds the store if any file changed (or if `force`, as on SIGHUP). On error the
    /// old store keeps serving. Stamps are taken *before* reading, so a file rewritten while
    /// we read it is seen as changed again on the next poll: an ACME client replacing the
    /// certificate and then the key produces at worst one refused reload, then a good one.
    pub fn reload(&mut self, force: bool) -> Result<Reload, CertError> {
        let stamps = Self::stamps_of(&self.pairs);
        if !force && stamps == self.stamps {
            return Ok(Reload::Unchanged);
        }
        self.stamps = stamps;
        let store = CertStore::load(&self.pairs, &self.provider)?;
        let description = store.describe();
        self.resolver.replace(store);
        Ok(Reload::Replaced(description))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SerialNumber};

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("jetrelay-tls-certs-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Writes a self-signed pair for `names` and returns its paths.
    fn write_pair(dir: &Path, stem: &str, names: &[&str], serial: u64) -> CertPair {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params.self_signed(&key).unwrap();
        let pair = CertPair {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        fs::write(&pair.cert, cert.pem()).unwrap();
        fs::write(&pair.key, key.serialize_pem()).unwrap();
        pair
    }

    fn leaf_of(key: &CertifiedKey) -> Vec<u8> {
        key.end_entity_cert().unwrap().as_ref().to_vec()
    }

    #[test]
    fn sni_exact_wildcard_and_default() {
        let dir = temp_dir("sni");
        let a = write_pair(&dir, "a", &["a.test", "www.a.test"], 1);
        let b = write_pair(&dir, "b", &["*.b.test", "B.test"], 2);
        let store = CertStore::load(&[a, b], &provider()).unwrap();
        let a_leaf = leaf_of(store.pick(None));
        let b_leaf = leaf_of(store.pick(Some("b.test")));
        assert_ne!(a_leaf, b_leaf);
        assert_eq!(leaf_of(store.pick(Some("a.test"))), a_leaf);
        assert_eq!(leaf_of(store.pick(Some("www.a.test"))), a_leaf);
        assert_eq!(leaf_of(store.pick(Some("x.b.test"))), b_leaf);
        assert_eq!(leaf_of(store.pick(Some("X.B.Test."))), b_leaf);
        // Wildcards are one label deep, and don't cover the apex.
        assert_eq!(leaf_of(store.pick(Some("y.x.b.test"))), a_leaf);
        assert_eq!(leaf_of(store.pick(Some("unknown.test"))), a_leaf);
        let described = store.describe();
        assert!(
            described.contains("*.b.test") && described.contains("b.test"),
            "{described}"
        );
    }

    #[test]
    fn mismatched_key_is_refused_naming_both_files() {
        let dir = temp_dir("mismatch");
        let a = write_pair(&dir, "a", &["a.test"], 1);
        let b = write_pair(&dir, "b", &["b.test"], 2);
        let crossed = CertPair {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        let err = CertStore::load(&[crossed], &provider()).unwrap_err();
        assert!(matches!(err, CertError::KeyMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("a.crt") && msg.contains("b.key"), "{msg}");
    }

    #[test]
    fn garbage_files_are_refused_without_leaking_key_text() {
        let dir = temp_dir("garbage");
        let a = write_pair(&dir, "a", &["a.test"], 1);
        let real_key = fs::read_to_string(&a.key).unwrap();

        // A truncated key: PEM framing broken half-way through the secret.
        let truncated = &real_key[..real_key.len() / 2];
        fs::write(&a.key, truncated).unwrap();
        let err = CertStore::load(std::slice::from_ref(&a), &provider()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CertError::NoKey { .. }), "{err:?}");
        assert!(msg.contains("a.key"), "{msg}");
        let secret_line = truncated.lines().nth(1).unwrap();
        assert!(!msg.contains(secret_line) && !format!("{err:?}").contains(secret_line));

        fs::write(&a.cert, "not a certificate\n").unwrap();
        let err = CertStore::load(std::slice::from_ref(&a), &provider()).unwrap_err();
        assert!(matches!(err, CertError::NoCertificate { .. }), "{err:?}");
        assert!(err.to_string().contains("a.crt"));

        let missing = CertPair {
            cert: dir.join("missing.crt"),
            key: a.key.clone(),
        };
        let err = CertStore::load(&[missing], &provider()).unwrap_err();
        assert!(err.to_string().contains("missing.crt"), "{err}");

        assert!(matches!(
            CertStore::load(&[], &provider()),
            Err(CertError::Empty)
        ));
    }

    #[test]
    fn reloader_swaps_only_on_change_and_keeps_old_store_on_error() {
        let dir = temp_dir("reload");
        let a = write_pair(&dir, "a", &["a.test"], 1);
        let provider = provider();
        let store = CertStore::load(std::slice::from_ref(&a), &provider).unwrap();
        let first = leaf_of(store.pick(None));
        let resolver = Arc::new(CertResolver::new(store));
        let mut reloader = CertReloader::new(vec![a.clone()], resolver.clone(), provider);
        assert!(matches!(reloader.reload(false), Ok(Reload::Unchanged)));

        // A broken replacement: refused, old certificate still served.
        fs::write(&a.cert, "garbage").unwrap();
        assert!(reloader.reload(false).is_err());
        assert_eq!(leaf_of(resolver.current().pick(None)), first);
        // Not retried until something changes again.
        assert!(matches!(reloader.reload(false), Ok(Reload::Unchanged)));

        // A good replacement is picked up.
        let fresh = write_pair(&dir, "a", &["a.test"], 2);
        assert_eq!(fresh, a);
        assert!(matches!(reloader.reload(false), Ok(Reload::Replaced(_))));
        let second = leaf_of(resolver.current().pick(None));
        assert_ne!(second, first);
        // Forced reload (SIGHUP) reloads even without a change.
        assert!(matches!(reloader.reload(true), Ok(Reload::Replaced(_))));
    }

    #[test]
    fn debug_output_has_no_key_material() {
        let dir = temp_dir("debug");
        let a = write_pair(&dir, "a", &["a.test"], 1);
        let store = CertStore::load(std::slice::from_ref(&a), &provider()).unwrap();
        let resolver = CertResolver::new(store);
        let debug = format!("{resolver:?}");
        assert!(debug.contains("a.test"), "{debug}");
        let key_pem = fs::read_to_string(&a.key).unwrap();
        let secret_line = key_pem.lines().nth(1).unwrap();
        assert!(!debug.contains(secret_line));
    }
}
