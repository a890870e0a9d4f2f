//! Who may log in through the bridge, and as which user.
//!
//! * `secret` logins: with [`AuthMode::Token`] (the default) the login must be the OS user that
//!   runs the gateway and the secret the gateway's *bridge token* (a random secret in a 0600 file
//!   next to the socket, printed by `knit token`), or a user from the configuration file with
//!   its password. With [`AuthMode::Open`] every login is accepted and becomes the user (for
//!   development and conformance tests, loopback only).
//! * `access-token` logins take the token a `welcome` carried; `gateway-token` logins take one
//!   from `create-token`. Both are HS256 JSON Web Tokens signed with a key derived from the
//!   bridge token, so they survive a gateway restart and die when the token file is replaced.

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value as J};
use sha2::{Digest, Sha256};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

type HmacSha256 = Hmac<Sha256>;

/// How `secret` logins are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// The OS user with the gateway's token, or a configured user with its password.
    Token,
    /// Any login, which becomes the user. Loopback only.
    Open,
}

impl std::str::FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "token" => Ok(AuthMode::Token),
            "open" => Ok(AuthMode::Open),
            other => Err(format!("auth mode must be token or open, not {other:?}")),
        }
    }
}

/// A password as configured: plain text, or the hex SHA-256 of it.
#[derive(Clone, PartialEq, Eq)]
pub enum Password {
    /// Compared as given.
    Plain(String),
    /// 32 bytes: the SHA-256 of the password.
    Sha256([u8; 32]),
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(..)")
    }
}

impl Password {
    /// Parses 64 hex digits.
    pub fn sha256_hex(hex: &str) -> Option<Password> {
        let b = hex.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            let s = std::str::from_utf8(&b[2 * i..2 * i + 2]).ok()?;
            *o = u8::from_str_radix(s, 16).ok()?;
        }
        Some(Password::Sha256(out))
    }

    fn matches(&self, given: &str) -> bool {
        match self {
            Password::Plain(p) => ct_eq(p.as_bytes(), given.as_bytes()),
            Password::Sha256(h) => ct_eq(h, &Sha256::digest(given.as_bytes())),
        }
    }
}

/// A user of the configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    /// What the client sends as `login`.
    pub login: String,
    /// Its password.
    pub password: Password,
    /// The user it becomes (peers see only peers of the same user); defaults to the login.
    pub user: String,
}

/// Whom a successful login made the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Login {
    pub user: String,
    /// Shown in `resolved_identity.login` (absent for gateway-token logins).
    pub login: Option<String>,
    /// Whether the welcome carries an access token.
    pub access_token: bool,
}

/// Authentication state of one bridge.
pub(crate) struct Authenticator {
    mode: AuthMode,
    os_user: String,
    token: String,
    users: Vec<UserEntry>,
    key: [u8; 32],
    throttle: Throttle,
}

/// Failed logins the bridge answers in one second, gateway-wide. Beyond that, every login is
/// refused unchecked until the next second, so a password cannot be guessed at the speed of
/// the loopback (about 17 000 guesses a second on one connection before; a 4-digit PIN now
/// takes a quarter of an hour, and the attempt is logged).
const MAX_FAILED_LOGINS_PER_S: u32 = 10;

/// The failed-login budget of the current second.
#[derive(Debug, Default)]
struct Throttle {
    /// (second, failures in it, logins refused unchecked in it).
    state: std::sync::Mutex<(u64, u32, u64)>,
}

impl Throttle {
    /// Whether a login may be checked at second `now`.
    fn admits(&self, now: u64) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.0 != now {
            if s.2 > 0 {
                crate::log::warn(format_args!(
                    "bridge: {} logins refused after {} failed ones within a second",
                    s.2, s.1
                ));
            }
            *s = (now, 0, 0);
        }
        if s.1 >= MAX_FAILED_LOGINS_PER_S {
            s.2 += 1;
            return false;
        }
        true
    }

    /// A login checked at second `now` failed.
    fn failed(&self, now: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.0 == now {
            s.1 += 1;
        }
    }
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("mode", &self.mode)
            .field("os_user", &self.os_user)
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

/// How long a `welcome` access token lives (the reference gateway's ~16.7 h).
const ACCESS_TTL_S: u64 = 60_000;
/// How long a `create-token` gateway token lives.
const GATEWAY_TTL_S: u64 = 600;

/// Constant-time equality (length is not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

impl Authenticator {
    pub(crate) fn new(
        mode: AuthMode,
        os_user: String,
        token: String,
        users: Vec<UserEntry>,
    ) -> Self {
        let mut mac = HmacSha256::new_from_slice(token.as_bytes()).expect("HMAC takes any key");
        mac.update(b"knit bridge token signing key v1");
        // A key of its own in open mode, where anyone on loopback gets tokens for any user:
        // what it issued must not log in once the gateway runs with real authentication again
        // (same token file).
        if mode == AuthMode::Open {
            mac.update(b" (open mode)");
        }
        let key: [u8; 32] = mac.finalize().into_bytes().into();
        Self {
            mode,
            os_user,
            token,
            users,
            key,
            throttle: Throttle::default(),
        }
    }

    /// Checks a hello's `authentication` object. Errors are the reason texts clients see
    /// (the reference gateway's, where it has one). Failed logins are throttled
    /// ([`MAX_FAILED_LOGINS_PER_S`]).
    pub(crate) fn authenticate(&self, auth: Option<&J>) -> Result<Login, String> {
        self.authenticate_at(auth, now_s())
    }

    fn authenticate_at(&self, auth: Option<&J>, now: u64) -> Result<Login, String> {
        if !self.throttle.admits(now) {
            return Err("Too many failed logins: try again in a moment".into());
        }
        let r = self.check(auth);
        if r.is_err() {
            self.throttle.failed(now);
        }
        r
    }

    fn check(&self, auth: Option<&J>) -> Result<Login, String> {
        let Some(J::Object(a)) = auth else {
            return Err("Unknown authentication method ".into());
        };
        if let Some(p) = a.get("provider") {
            let p = p
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| p.to_string());
            return Err(format!(
                "Requested authentication provider :{} is not available",
                super::gw3::clip(&p)
            ));
        }
        match a.get("method").and_then(J::as_str) {
            Some("secret") => {
                let (Some(login), Some(secret)) = (
                    a.get("login").and_then(J::as_str),
                    a.get("secret").and_then(J::as_str),
                ) else {
                    return Err("Missing login/secret".into());
                };
                self.check_secret(login, secret)
            }
            Some(m @ ("access-token" | "gateway-token")) => {
                let kind = if m == "access-token" {
                    "access"
                } else {
                    "gateway"
                };
                let token = a.get("token").and_then(J::as_str).unwrap_or("");
                let claims = self
                    .verify(token, kind)
                    .map_err(|e| format!("Invalid or expired token: {e}"))?;
                let user = claims
                    .get("user")
                    .and_then(J::as_str)
                    .unwrap_or_default()
                    .to_string();
                // A token dies with its user: one issued to a login or user that the
                // configuration no longer has (removed, or mapped to another user since) is
                // refused, though its signature still holds.
                if !self.still_known(&user, claims.get("login").and_then(J::as_str)) {
                    return Err("Invalid or expired token: its user is no longer configured".into());
                }
                Ok(if kind == "access" {
                    let login = claims
                        .get("login")
                        .and_then(J::as_str)
                        .unwrap_or(&user)
                        .to_string();
                    Login {
                        user,
                        login: Some(login),
                        access_token: true,
                    }
                } else {
                    Login {
                        user,
                        login: None,
                        access_token: false,
                    }
                })
            }
            Some(other) => Err(format!(
                "Unknown authentication method {}",
                super::gw3::clip(other)
            )),
            None => Err("Unknown authentication method ".into()),
        }
    }

    /// Whether a token's `user` (and `login`, when it has one) could still log in now: always
    /// in open mode; in token mode, the OS user or a configured entry mapping to that user.
    fn still_known(&self, user: &str, login: Option<&str>) -> bool {
        if self.mode == AuthMode::Open {
            return true;
        }
        match login {
            Some(l) => {
                (l == self.os_user && user == self.os_user)
                    || self.users.iter().any(|u| u.login == l && u.user == user)
            }
            None => user == self.os_user || self.users.iter().any(|u| u.user == user),
        }
    }

    fn check_secret(&self, login: &str, secret: &str) -> Result<Login, String> {
        let ok = |user: &str| Login {
            user: user.to_string(),
            login: Some(login.to_string()),
            access_token: true,
        };
        if self.mode == AuthMode::Open {
            return Ok(ok(login));
        }
        if login == self.os_user && ct_eq(secret.as_bytes(), self.token.as_bytes()) {
            return Ok(ok(&self.os_user));
        }
        if let Some(u) = self
            .users
            .iter()
            .find(|u| u.login == login && u.password.matches(secret))
        {
            return Ok(ok(&u.user));
        }
        Err("Invalid login/secret".into())
    }

    /// The access token a `welcome` carries.
    pub(crate) fn access_token(&self, login: &Login) -> String {
        let mut claims =
            json!({"kind": "access", "user": login.user, "exp": now_s() + ACCESS_TTL_S});
        if let Some(l) = &login.login {
            claims["login"] = J::String(l.clone());
        }
        self.sign(&claims)
    }

    /// A short-lived token for `gateway-token` logins (`create-token`).
    pub(crate) fn gateway_token(&self, user: &str) -> String {
        self.sign(&json!({"kind": "gateway", "user": user, "exp": now_s() + GATEWAY_TTL_S}))
    }

    fn sign(&self, claims: &J) -> String {
        let header = b64().encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = b64().encode(claims.to_string());
        let signing = format!("{header}.{payload}");
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(signing.as_bytes());
        let sig = b64().encode(mac.finalize().into_bytes());
        format!("{signing}.{sig}")
    }

    fn verify(&self, token: &str, kind: &str) -> Result<serde_json::Map<String, J>, &'static str> {
        let mut parts = token.splitn(3, '.');
        let (Some(h), Some(p), Some(s)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("invalid token");
        };
        let sig = b64().decode(s).map_err(|_| "invalid token")?;
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(p.as_bytes());
        mac.verify_slice(&sig).map_err(|_| "invalid token")?;
        let payload = b64().decode(p).map_err(|_| "invalid token")?;
        let claims: serde_json::Map<String, J> =
            serde_json::from_slice(&payload).map_err(|_| "invalid token")?;
        if claims.get("kind").and_then(J::as_str) != Some(kind) {
            return Err("wrong kind of token");
        }
        match claims.get("exp").and_then(J::as_u64) {
            Some(exp) if exp > now_s() => Ok(claims),
            _ => Err("token expired"),
        }
    }
}

/// Reads the bridge token at `path`, creating it (32 random bytes as hex, mode 0600) when it is
/// missing, malformed or readable by others.
pub(crate) fn load_or_create_token(path: &Path) -> io::Result<String> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let private = meta.file_type().is_file() && meta.permissions().mode() & 0o077 == 0;
        if private {
            let text = std::fs::read_to_string(path)?;
            let t = text.trim();
            if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(t.to_string());
            }
        }
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| io::Error::other(format!("random bytes: {e}")))?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = path.with_extension(format!("token.tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        writeln!(f, "{token}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(token)
}

/// Reads the token of the gateway whose socket is `socket` (for `knit token`).
pub fn read_token(socket: &Path) -> io::Result<String> {
    let path = token_path(socket);
    let text = std::fs::read_to_string(&path)?;
    Ok(text.trim().to_string())
}

/// Where the bridge token of the gateway at `socket` lives.
pub fn token_path(socket: &Path) -> std::path::PathBuf {
    crate::control::sibling(socket, "token")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(mode: AuthMode) -> Authenticator {
        let users = vec![
            UserEntry {
                login: "alice".into(),
                password: Password::Plain("wonder".into()),
                user: "alice".into(),
            },
            UserEntry {
                login: "bob".into(),
                password: Password::sha256_hex(
                    "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8",
                )
                .unwrap(),
                user: "team".into(),
            },
        ];
        Authenticator::new(mode, "me".into(), "t0k".into(), users)
    }

    fn secret(login: &str, s: &str) -> J {
        json!({"method": "secret", "login": login, "secret": s})
    }

    #[test]
    fn token_mode_accepts_the_os_user_with_the_token_and_configured_users() {
        let a = auth(AuthMode::Token);
        assert_eq!(
            a.authenticate(Some(&secret("me", "t0k"))).unwrap().user,
            "me"
        );
        assert_eq!(
            a.authenticate(Some(&secret("alice", "wonder")))
                .unwrap()
                .user,
            "alice"
        );
        // "password" hashed in the configuration; the user is mapped.
        assert_eq!(
            a.authenticate(Some(&secret("bob", "password")))
                .unwrap()
                .user,
            "team"
        );
        for (l, s) in [
            ("me", "x"),
            ("alice", "t0k"),
            ("bob", "Password"),
            ("eve", ""),
        ] {
            assert_eq!(
                a.authenticate(Some(&secret(l, s))).unwrap_err(),
                "Invalid login/secret"
            );
        }
    }

    #[test]
    fn open_mode_accepts_any_login_as_the_user() {
        let a = auth(AuthMode::Open);
        let l = a.authenticate(Some(&secret("harness", ""))).unwrap();
        assert_eq!(
            (l.user.as_str(), l.login.as_deref()),
            ("harness", Some("harness"))
        );
        assert_eq!(
            a.authenticate(Some(&json!({"method": "secret", "login": "x"})))
                .unwrap_err(),
            "Missing login/secret"
        );
    }

    #[test]
    fn failures_carry_the_reference_reasons() {
        let a = auth(AuthMode::Open);
        assert_eq!(
            a.authenticate(None).unwrap_err(),
            "Unknown authentication method "
        );
        assert_eq!(
            a.authenticate(Some(&json!({"method": "kerberos"})))
                .unwrap_err(),
            "Unknown authentication method kerberos"
        );
        assert_eq!(
            a.authenticate(Some(&json!({"provider": "nope", "method": "secret"})))
                .unwrap_err(),
            "Requested authentication provider :nope is not available"
        );
        assert_eq!(
            a.authenticate(Some(
                &json!({"method": "access-token", "token": "not-a-jwt"})
            ))
            .unwrap_err(),
            "Invalid or expired token: invalid token"
        );
    }

    #[test]
    fn tokens_round_trip_by_kind_and_are_bound_to_the_bridge_token() {
        let a = auth(AuthMode::Token);
        let login = a.authenticate(Some(&secret("alice", "wonder"))).unwrap();
        let access = a.access_token(&login);
        let l = a
            .authenticate(Some(&json!({"method": "access-token", "token": access})))
            .unwrap();
        assert_eq!(
            (l.user.as_str(), l.login.as_deref()),
            ("alice", Some("alice"))
        );
        let gw = a.gateway_token("alice");
        let l = a
            .authenticate(Some(&json!({"method": "gateway-token", "token": gw})))
            .unwrap();
        assert_eq!(
            (l.user.as_str(), l.login, l.access_token),
            ("alice", None, false)
        );
        // Kinds do not mix.
        assert!(a
            .authenticate(Some(&json!({"method": "gateway-token", "token": access})))
            .is_err());
        // Another bridge token, another key.
        let other = Authenticator::new(AuthMode::Token, "me".into(), "other".into(), vec![]);
        assert!(other
            .authenticate(Some(&json!({"method": "access-token", "token": access})))
            .is_err());
        // Tampering with the claims breaks the signature.
        let mut parts: Vec<&str> = access.split('.').collect();
        let forged = b64().encode(r#"{"kind":"access","user":"root","exp":9999999999}"#);
        parts[1] = &forged;
        assert!(a
            .authenticate(Some(
                &json!({"method": "access-token", "token": parts.join(".")})
            ))
            .is_err());
    }

    /// Tokens issued in open mode (to anyone, for any user) do not log in once the gateway
    /// runs in token mode with the same token file, nor the reverse.
    #[test]
    fn open_mode_tokens_do_not_log_in_under_token_mode() {
        let open = auth(AuthMode::Open);
        let strict = auth(AuthMode::Token);
        let login = open.authenticate(Some(&secret("me", "anything"))).unwrap();
        let access = open.access_token(&login);
        let gw = open.gateway_token("me");
        for (method, token) in [("access-token", &access), ("gateway-token", &gw)] {
            assert!(open
                .authenticate(Some(&json!({"method": method, "token": token})))
                .is_ok());
            let e = strict
                .authenticate(Some(&json!({"method": method, "token": token})))
                .unwrap_err();
            assert_eq!(e, "Invalid or expired token: invalid token", "{method}");
        }
        let real = strict.gateway_token("me");
        assert!(open
            .authenticate(Some(&json!({"method": "gateway-token", "token": real})))
            .is_err());
    }

    /// After ten failed logins in a second every login is refused unchecked (even a right
    /// one, which would otherwise tell the guesser it found it) until the next second.
    #[test]
    fn failed_logins_are_throttled_per_second() {
        let a = auth(AuthMode::Token);
        for i in 0..MAX_FAILED_LOGINS_PER_S {
            let e = a
                .authenticate_at(Some(&secret("alice", &format!("guess{i}"))), 100)
                .unwrap_err();
            assert_eq!(e, "Invalid login/secret");
        }
        let e = a
            .authenticate_at(Some(&secret("alice", "wonder")), 100)
            .unwrap_err();
        assert_eq!(e, "Too many failed logins: try again in a moment");
        // The next second: checked again.
        let l = a
            .authenticate_at(Some(&secret("alice", "wonder")), 101)
            .unwrap();
        assert_eq!(l.user, "alice");
        // Successes do not count.
        for _ in 0..2 * MAX_FAILED_LOGINS_PER_S {
            a.authenticate_at(Some(&secret("alice", "wonder")), 102)
                .unwrap();
        }
    }

    #[test]
    fn the_token_file_is_private_and_kept() {
        let dir = std::env::temp_dir().join(format!("knit-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gw.token");
        let t1 = load_or_create_token(&path).unwrap();
        assert_eq!(t1.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_token(&path).unwrap(), t1);
        // Readable by others: replaced.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let t2 = load_or_create_token(&path).unwrap();
        assert_ne!(t1, t2);
        assert_eq!(read_token(&dir.join("gw.sock")).unwrap(), t2);
        let _ = std::fs::remove_dir_all(dir);
    }
}
