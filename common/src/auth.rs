//! Who may do what: bearer tokens from a tokens file, each with a name, a tenant and a
//! role, shared by the producer and the scaler.
//!
//! The file (`TOKENS_FILE`) keeps only a SHA-256 hash of each token: a token is shown
//! once, when `producer token add` makes it, and never again.
//!
//! ```toml
//! [[token]]
//! name = "ci"
//! tenant = "acme"
//! role = "submitter"
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! ```
//!
//! A request carries its token as `Authorization: Bearer <token>` (or, from the
//! dashboard's login form, in the `spillway_token` cookie). Presented tokens are
//! hashed and compared with every entry in constant time. Without a tokens file a
//! process is open, which it allows only while it listens on a loopback address or
//! with `AUTH=off` set explicitly ([`Access::from_settings`]).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use axum::{
    Json,
    extract::{Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use clap::Args;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The cookie the dashboard's login form keeps a token in.
pub const COOKIE: &str = "spillway_token";
/// What every token starts with, so that one pasted somewhere is recognisable.
const TOKEN_PREFIX: &str = "spw_";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Upload, and see and act on its own tenant's batches.
    Submitter,
    /// Everything: every tenant, dead letters, pausing job types, worker logs.
    Admin,
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name (never the token).
    pub name: String,
    pub tenant: String,
    pub role: Role,
}

/// The tenant of batches uploaded to an open process, and of batches recorded before
/// tenants existed.
pub const DEFAULT_TENANT: &str = "default";

impl Principal {
    /// Everyone, on a process without a tokens file.
    pub fn open() -> Self {
        Principal {
            name: "anonymous".into(),
            tenant: DEFAULT_TENANT.into(),
            role: Role::Admin,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Whether it may see (and act on) what belongs to `tenant`.
    pub fn sees(&self, tenant: &str) -> bool {
        self.is_admin() || self.tenant == tenant
    }

    /// The tenant its listings are limited to: `None` for an admin, who sees all.
    pub fn tenant_filter(&self) -> Option<&str> {
        (!self.is_admin()).then_some(self.tenant.as_str())
    }
}

/// One line of the tokens file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    tenant: String,
    role: Role,
    /// The token's SHA-256, in hex.
    sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default, rename = "token")]
    tokens: Vec<Entry>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read TOKENS_FILE {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TOKENS_FILE {path} is not a tokens file: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("TOKENS_FILE {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error("cannot write TOKENS_FILE {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make a token: the system's random numbers failed: {0}")]
    Random(getrandom::Error),
}

/// The tokens of a tokens file, as hashes.
#[derive(Debug)]
pub struct Tokens {
    entries: Vec<(Entry, [u8; 32])>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Names and tenants are shown on pages and in logs: plain words only.
fn is_plain(word: &str) -> bool {
    !word.is_empty()
        && word.len() <= 64
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Tokens {
    /// Reads and checks the tokens file at `path`: every entry named once, with a
    /// plain name and tenant and a 64-digit hex hash.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.into(),
            source,
        })?;
        let file: File = toml::from_str(&text).map_err(|source| AuthError::Parse {
            path: path.into(),
            source,
        })?;
        let invalid = |problem: String| AuthError::Invalid {
            path: path.into(),
            problem,
        };
        let mut entries = Vec::with_capacity(file.tokens.len());
        for entry in file.tokens {
            for (what, word) in [("name", &entry.name), ("tenant", &entry.tenant)] {
                if !is_plain(word) {
                    return Err(invalid(format!(
                        "token {:?}: its {what} {word:?} must be 1 to 64 letters, digits, '-', '_' or '.'",
                        entry.name
                    )));
                }
            }
            if entries
                .iter()
                .any(|(e, _): &(Entry, _)| e.name == entry.name)
            {
                return Err(invalid(format!("two tokens are named {:?}", entry.name)));
            }
            let hash = decode_hex(&entry.sha256).ok_or_else(|| {
                invalid(format!(
                    "token {:?}: sha256 must be 64 hexadecimal digits",
                    entry.name
                ))
            })?;
            entries.push((entry, hash));
        }
        Ok(Tokens { entries })
    }

    /// Who `token` is, if it is one of the file's. Every entry is compared, in
    /// constant time, whichever matches.
    pub fn verify(&self, token: &str) -> Option<Principal> {
        let presented = digest(token);
        let mut found = None;
        for (entry, hash) in &self.entries {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(entry);
            }
        }
        found.map(|entry| Principal {
            name: entry.name.clone(),
            tenant: entry.tenant.clone(),
            role: entry.role,
        })
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Makes a new token called `name` for `tenant` with `role`, adds its hash to the
    /// tokens file at `path` (created if missing, readable by its owner only) and
    /// returns the token: the only time it is ever shown.
    pub fn add(path: &Path, name: &str, tenant: &str, role: Role) -> Result<String, AuthError> {
        let mut file = if path.exists() {
            Tokens::load(path)?;
            let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
                path: path.into(),
                source,
            })?;
            toml::from_str(&text).map_err(|source| AuthError::Parse {
                path: path.into(),
                source,
            })?
        } else {
            File::default()
        };
        let invalid = |problem: String| AuthError::Invalid {
            path: path.into(),
            problem,
        };
        for (what, word) in [("name", name), ("tenant", tenant)] {
            if !is_plain(word) {
                return Err(invalid(format!(
                    "the {what} {word:?} must be 1 to 64 letters, digits, '-', '_' or '.'"
                )));
            }
        }
        if file.tokens.iter().any(|e| e.name == name) {
            return Err(invalid(format!(
                "a token named {name:?} exists already: choose another name"
            )));
        }
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(AuthError::Random)?;
        let token = format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
        );
        file.tokens.push(Entry {
            name: name.into(),
            tenant: tenant.into(),
            role,
            sha256: hex(&digest(&token)),
        });
        let text = toml::to_string(&file).expect("a tokens file serialises");
        write_private(path, &text).map_err(|source| AuthError::Write {
            path: path.into(),
            source,
        })?;
        Ok(token)
    }
}

fn decode_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Writes `text` to `path` through a temporary file readable by its owner only.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let partial = path.with_extension("partial");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(partial, path)
}

/// The settings of who may do what.
#[derive(Debug, Clone, Args)]
pub struct AuthSettings {
    /// The tokens file; unset, the process is open (only on a loopback address, or
    /// with AUTH=off).
    #[arg(long = "tokens-file", env = "TOKENS_FILE", value_name = "TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// `off` opens a process bound to any address to everyone, without tokens.
    #[arg(long = "auth", env = "AUTH", value_name = "AUTH", value_parser = ["off"])]
    pub auth: Option<String>,
    /// `1` serves /metrics without a token (for Prometheus inside the cluster).
    #[arg(
        long = "metrics-public",
        env = "METRICS_PUBLIC",
        value_name = "METRICS_PUBLIC",
        default_value = "0",
        value_parser = ["0", "1"]
    )]
    pub metrics_public: String,
}

/// Who may reach a process's API.
#[derive(Debug)]
pub enum Access {
    /// Only holders of these tokens.
    Tokens(Tokens),
    /// Everyone, as an admin: no tokens file.
    Open,
}

/// A process's access rule and what it leaves open.
#[derive(Debug, Clone)]
pub struct Gate {
    access: Arc<Access>,
    metrics_public: bool,
}

impl Access {
    /// The access of a process listening on `listen`: its tokens file's; or open when
    /// there is none and it listens on a loopback address only, or `AUTH=off` is set
    /// (each logged as a warning). Bound to any other address without tokens, it is an
    /// error: anyone who can reach it could submit work and read every log.
    pub fn from_settings(settings: &AuthSettings, listen: SocketAddr) -> anyhow::Result<Gate> {
        let access = match (&settings.tokens_file, settings.auth.as_deref()) {
            (Some(path), _) => {
                let tokens = Tokens::load(path)?;
                if tokens.is_empty() {
                    anyhow::bail!(
                        "TOKENS_FILE {} holds no token: add one with `producer token add NAME --tenant T --role admin`",
                        path.display()
                    );
                }
                tracing::info!(tokens_file = %path.display(), tokens = tokens.len(), "requests need a token");
                Access::Tokens(tokens)
            }
            (None, Some("off")) => {
                tracing::warn!(%listen, "AUTH=off: every request is allowed, as an admin, to anyone who can reach {listen}");
                Access::Open
            }
            (None, _) if listen.ip().is_loopback() => {
                tracing::warn!(%listen, "no TOKENS_FILE: open to every request, which only this machine can make (loopback)");
                Access::Open
            }
            (None, _) => anyhow::bail!(
                "listening on {listen} with no TOKENS_FILE would let anyone who can reach it \
                 submit work and read every batch: set TOKENS_FILE (make tokens with `producer \
                 token add`), listen on a loopback address, or set AUTH=off to allow it"
            ),
        };
        Ok(Gate {
            access: Arc::new(access),
            metrics_public: settings.metrics_public == "1",
        })
    }
}

impl Gate {
    /// A gate open to everyone (tests of what lies behind it).
    pub fn open() -> Self {
        Gate {
            access: Arc::new(Access::Open),
            metrics_public: true,
        }
    }

    /// A gate holding `tokens`.
    pub fn with_tokens(tokens: Tokens, metrics_public: bool) -> Self {
        Gate {
            access: Arc::new(Access::Tokens(tokens)),
            metrics_public,
        }
    }

    /// Whether `path` is served to anyone: the probes, the login form, the OpenAPI
    /// document, and the metrics when public.
    pub fn is_open(&self, path: &str) -> bool {
        matches!(
            path,
            "/healthz" | "/readyz" | "/login" | crate::openapi::PATH
        ) || (path == "/metrics" && self.metrics_public)
    }

    /// Who `headers` say the request comes from: `None` for no token or a wrong one.
    pub fn principal(&self, headers: &HeaderMap) -> Option<Principal> {
        match &*self.access {
            Access::Open => Some(Principal::open()),
            Access::Tokens(tokens) => tokens.verify(&presented(headers)?),
        }
    }

    /// Whether tokens are asked for at all.
    pub fn needs_tokens(&self) -> bool {
        matches!(&*self.access, Access::Tokens(_))
    }
}

/// The token a request presents: its bearer token, else the dashboard's cookie.
pub fn presented(headers: &HeaderMap) -> Option<String> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE).then(|| value.to_string())
        })
}

/// Whether the request comes from a browser navigating (which a login page serves
/// better than a JSON error).
fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

/// Middleware: lets open paths through, and any other request only with a valid token,
/// whose [`Principal`] it adds to the request's extensions; answers 401 otherwise.
pub async fn require_token(State(gate): State<Gate>, mut request: Request, next: Next) -> Response {
    if gate.is_open(request.uri().path()) {
        return next.run(request).await;
    }
    match gate.principal(request.headers()) {
        Some(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        None if wants_html(request.headers()) => {
            axum::response::Redirect::to("/login").into_response()
        }
        None => {
            let why = if presented(request.headers()).is_some() {
                "this token is not valid here"
            } else {
                "a token is required: send it as `Authorization: Bearer <token>`"
            };
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(serde_json::json!({ "error": why })),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens_file() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        (dir, path)
    }

    #[test]
    fn an_added_token_is_shown_once_kept_as_a_hash_and_verified() {
        let (_dir, path) = tokens_file();
        let admin = Tokens::add(&path, "ops", "default", Role::Admin).unwrap();
        let acme = Tokens::add(&path, "ci", "acme", Role::Submitter).unwrap();
        assert!(
            admin.starts_with(TOKEN_PREFIX) && admin.len() > 40,
            "{admin}"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&admin) && !text.contains(&acme), "{text}");
        assert!(text.contains(&hex(&digest(&acme))), "{text}");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "readable by its owner only");

        let tokens = Tokens::load(&path).unwrap();
        let who = tokens.verify(&acme).unwrap();
        assert_eq!((who.name.as_str(), who.tenant.as_str()), ("ci", "acme"));
        assert!(!who.is_admin() && who.sees("acme") && !who.sees("other"));
        assert!(tokens.verify(&admin).unwrap().sees("other"));
        assert!(tokens.verify("spw_not-a-token").is_none());
        assert!(tokens.verify(&acme[..acme.len() - 1]).is_none());
    }

    #[test]
    fn a_second_token_of_the_same_name_or_a_bad_word_is_refused() {
        let (_dir, path) = tokens_file();
        Tokens::add(&path, "ci", "acme", Role::Submitter).unwrap();
        let again = Tokens::add(&path, "ci", "acme", Role::Admin).unwrap_err();
        assert!(again.to_string().contains("exists already"), "{again}");
        let bad = Tokens::add(&path, "c i", "acme", Role::Admin).unwrap_err();
        assert!(bad.to_string().contains("letters, digits"), "{bad}");
        let tenant = Tokens::add(&path, "x", "<b>", Role::Admin).unwrap_err();
        assert!(tenant.to_string().contains("tenant"), "{tenant}");
    }

    #[test]
    fn a_broken_tokens_file_says_what_is_wrong() {
        let (_dir, path) = tokens_file();
        std::fs::write(
            &path,
            "[[token]]\nname = \"a\"\ntenant = \"t\"\nrole = \"admin\"\nsha256 = \"abc\"\n",
        )
        .unwrap();
        let error = Tokens::load(&path).unwrap_err().to_string();
        assert!(error.contains("64 hexadecimal digits"), "{error}");
        std::fs::write(&path, "[[token]]\nname = \"a\"\nrole = \"boss\"\n").unwrap();
        let error = Tokens::load(&path).unwrap_err().to_string();
        assert!(error.contains("not a tokens file"), "{error}");
    }

    fn settings(tokens_file: Option<PathBuf>, auth: Option<&str>) -> AuthSettings {
        AuthSettings {
            tokens_file,
            auth: auth.map(str::to_string),
            metrics_public: "0".into(),
        }
    }

    #[test]
    fn without_tokens_a_process_is_open_only_on_loopback_or_with_auth_off() {
        let loopback: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let anywhere: SocketAddr = "0.0.0.0:8000".parse().unwrap();
        assert!(
            !Access::from_settings(&settings(None, None), loopback)
                .unwrap()
                .needs_tokens()
        );
        let error = Access::from_settings(&settings(None, None), anywhere).unwrap_err();
        assert!(error.to_string().contains("AUTH=off"), "{error}");
        assert!(
            !Access::from_settings(&settings(None, Some("off")), anywhere)
                .unwrap()
                .needs_tokens()
        );
        let (_dir, path) = tokens_file();
        Tokens::add(&path, "ops", "default", Role::Admin).unwrap();
        assert!(
            Access::from_settings(&settings(Some(path), None), anywhere)
                .unwrap()
                .needs_tokens()
        );
    }

    #[test]
    fn probes_and_the_login_form_are_open_and_metrics_only_when_public() {
        let (_dir, path) = tokens_file();
        Tokens::add(&path, "ops", "default", Role::Admin).unwrap();
        let private = Gate::with_tokens(Tokens::load(&path).unwrap(), false);
        let public = Gate::with_tokens(Tokens::load(&path).unwrap(), true);
        for open in ["/healthz", "/readyz", "/login"] {
            assert!(private.is_open(open), "{open}");
        }
        assert!(!private.is_open("/metrics") && public.is_open("/metrics"));
        assert!(!public.is_open("/batches") && !public.is_open("/api/stats"));
    }

    #[test]
    fn a_token_is_read_from_the_bearer_header_or_the_dashboard_cookie() {
        let mut headers = HeaderMap::new();
        assert_eq!(presented(&headers), None);
        headers.insert(
            header::COOKIE,
            "theme=dark; spillway_token=spw_c".parse().unwrap(),
        );
        assert_eq!(presented(&headers).as_deref(), Some("spw_c"));
        headers.insert(header::AUTHORIZATION, "Bearer spw_b".parse().unwrap());
        assert_eq!(presented(&headers).as_deref(), Some("spw_b"));
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(presented(&headers), None, "only bearer tokens");
    }
}
