//! The `knit` command line (DESIGN §5). Output is JSON on stdout, one value per line; errors are
//! one line on stderr; the exit code says what happened (0 ok, 2 usage, 3 no server, 4 timeout,
//! 5 remote failure, 6 gateway unreachable, 7 permission denied, 8 bad input).

/// `println!` for command output: a reader that went away ends the command quietly
/// ([`out_line`]) instead of a panic.
macro_rules! outln {
    ($($t:tt)*) => {
        $crate::cli::out_line(format_args!($($t)*))
    };
}

/// `eprintln!` that never panics: a closed stderr loses the line ([`knit::log::line`]).
macro_rules! errln {
    ($($t:tt)*) => {
        knit::log::line(format_args!($($t)*))
    };
}

mod bench;
mod outq;

use clap::{Parser, Subcommand};
use knit::client::{Client, ClientError, InvokeError, InvokeOptions, Responder};
use knit::gateway::{Gateway, GatewayConfig};
use knit::model::Target;
use knit::wait::WaitStrategy;
use knit::{Status, Value};
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "knit",
    version,
    about = "Desktop interop over shared memory: gateway and tools"
)]
struct Cli {
    /// Gateway socket (default: $KNIT_GATEWAY, else $XDG_RUNTIME_DIR/knit/gateway.sock, else
    /// /tmp/knit-<uid>/gateway.sock).
    #[arg(long, global = true, value_name = "PATH")]
    gateway: Option<PathBuf>,
    /// Application name this tool connects as.
    #[arg(long, global = true, value_name = "NAME")]
    app: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the gateway until SIGINT/SIGTERM.
    Gateway(GatewayArgs),
    /// List methods and their servers.
    Methods {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Invoke a method and print the io.Connect-shaped result.
    Invoke {
        method: String,
        /// Arguments as JSON, `@FILE`, or `-` for standard input (default `{}`).
        args: Option<String>,
        /// best, all, skip-mine, or an application name (case-insensitive).
        #[arg(long, default_value = "best")]
        target: String,
        /// How long to wait for a server to appear.
        #[arg(long, default_value_t = 3000)]
        wait_ms: u64,
        /// How long each server has to answer.
        #[arg(long, default_value_t = 30000)]
        timeout_ms: u64,
    },
    /// Serve a method (for demos and tests) until killed.
    #[command(group(clap::ArgGroup::new("answer").required(true).args(["echo", "reply"])))]
    Serve {
        method: String,
        /// Return the arguments.
        #[arg(long)]
        echo: bool,
        /// Return this JSON.
        #[arg(long, value_name = "JSON")]
        reply: Option<String>,
        /// Wait this long before answering.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// How the server waits: spin, park, spin-then-park[:MICROS].
        #[arg(long, default_value = "spin-then-park")]
        wait: String,
    },
    /// Publish a message on a topic.
    Pub {
        topic: String,
        /// The message as JSON, `@FILE` or `-`.
        json: String,
        #[arg(long)]
        routing_key: Option<String>,
    },
    /// Print one JSON line per message on a topic.
    Sub {
        topic: String,
        #[arg(long)]
        routing_key: Option<String>,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Interop streams.
    Stream {
        #[command(subcommand)]
        cmd: StreamCmd,
    },
    /// Shared contexts.
    Ctx {
        #[command(subcommand)]
        cmd: CtxCmd,
    },
    /// Print the WebSocket bridge token of this user's gateway (the `secret` of a GW3 login
    /// as the OS user).
    Token,
    /// Measure (see the README for what each scenario compares against).
    Bench(bench::BenchArgs),
    #[command(hide = true, name = "__bench-peer")]
    BenchPeer(bench::PeerArgs),
    /// A relay that does nothing but copy WebSocket frames: the bridge benchmark's baseline.
    #[command(hide = true, name = "__ws-relay")]
    WsRelay(bench::relay::RelayArgs),
    /// The keeper a gateway starts to hold its contexts across restarts (not for humans).
    #[command(hide = true, name = "__keeper")]
    Keeper {
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        #[arg(long, value_name = "MS")]
        linger_ms: u64,
    },
}

#[derive(Subcommand, Debug)]
enum StreamCmd {
    /// Serve a stream that pushes {"seq": n, "time": ms} at a rate, until killed.
    Serve {
        name: String,
        /// Pushes per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
    },
    /// Print one JSON line per item of a stream.
    Sub {
        name: String,
        /// Exit after this many items.
        #[arg(long)]
        count: Option<u64>,
        /// How long to wait for the stream to appear.
        #[arg(long, default_value_t = 3000)]
        wait_ms: u64,
        /// JSON arguments for the subscription.
        #[arg(long)]
        args: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum CtxCmd {
    /// Print the context's data (`{}` when it does not exist).
    Get { name: String },
    /// Replace the whole value; prints {"version": N}.
    Set { name: String, json: String },
    /// Replace top-level keys (null deletes); prints {"version": N}.
    Update { name: String, json: String },
    /// Set one dotted path (null deletes); prints {"version": N}.
    SetPath {
        name: String,
        path: String,
        json: String,
    },
    /// Destroy the context.
    Destroy { name: String },
    /// Print the names of all contexts.
    List,
    /// Print one JSON line per change (the current value first).
    Watch {
        name: String,
        /// Exit after this many lines.
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(clap::Args, Debug)]
struct GatewayArgs {
    /// WebSocket bridge address (default 127.0.0.1:8385; port 0 picks a free one).
    #[arg(long, value_name = "ADDR", conflicts_with = "no_ws")]
    ws: Option<String>,
    /// Run without the WebSocket bridge.
    #[arg(long)]
    no_ws: bool,
    /// Bridge authentication: token (default) or open (any login; loopback only).
    #[arg(long, value_name = "MODE")]
    ws_auth: Option<String>,
    /// Gateway configuration (JSON).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Largest payload a peer may send, in bytes (default 16 MiB).
    #[arg(long, value_name = "BYTES")]
    max_payload: Option<u64>,
    /// Access-control policy (JSON: `{"default": …, "rules": […]}`; see the README). Replaces
    /// the configuration file's `policy`.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Do not start a keeper: contexts then live only as long as this gateway process.
    #[arg(long)]
    no_keeper: bool,
    /// How long the keeper holds the contexts after this gateway vanished without stopping
    /// cleanly, waiting for a new gateway, in seconds (default 600).
    #[arg(long, value_name = "SECONDS", conflicts_with = "no_keeper")]
    keeper_linger: Option<f64>,
}

/// A failure the CLI reports: one line on stderr and an exit code.
#[derive(Debug)]
pub(crate) struct CliError {
    pub status: Status,
    pub message: String,
}

impl CliError {
    pub(crate) fn new(status: Status, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError::new(e.status(), e.to_string())
    }
}

type CliResult = Result<(), CliError>;

/// A usage error as one line, as every error is (clap's is a paragraph, a usage line and a
/// hint): "the following required arguments were not provided: <METHOD> (usage: knit invoke
/// <METHOD> [ARGS]; see --help)". `what` replaces the first paragraph (when clap rendered a
/// whole help instead of an error).
fn one_line_usage_error(rendered: &str, what: Option<&str>) -> String {
    let mut paragraphs = rendered.split("\n\n");
    let first = paragraphs.next().unwrap_or_default();
    let what = what.unwrap_or(first.strip_prefix("error: ").unwrap_or(first));
    let what = what.split_whitespace().collect::<Vec<_>>().join(" ");
    let usage = paragraphs
        .find_map(|p| p.trim().strip_prefix("Usage: "))
        .map(|u| u.split_whitespace().collect::<Vec<_>>().join(" "));
    // clap leaves the usage out of some errors (an invalid value): the subcommand's then.
    let usage = usage.or_else(invoked_usage).unwrap_or_default();
    with_usage(&what, &usage)
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            if e.use_stderr() {
                // Without a command clap renders the whole help: its usage line is kept.
                let missing =
                    e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand;
                let what = missing.then_some("a command is required");
                errln!(
                    "knit: {}",
                    one_line_usage_error(&e.render().to_string(), what)
                );
                return 2;
            }
            // `--help`, `--version`: output like any other, so a failed write is exit 1 (and a
            // reader that went away, 0).
            use std::io::Write;
            return match e.print().and_then(|()| std::io::stdout().flush()) {
                Ok(()) => 0,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
                Err(e) => {
                    errln!("knit: cannot write the output: {e}");
                    1
                }
            };
        }
    };
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            let code = e.status.exit_code();
            if code == 2 && !e.message.contains("see --help") {
                // A usage error found past the parser reads like one the parser found.
                let usage = invoked_usage().unwrap_or_default();
                errln!("knit: {}", with_usage(&e.message, &usage));
            } else {
                errln!("knit: {}", e.message);
            }
            code
        }
    }
}

/// The usage line of the (sub)command this process was run as: the command line's words that
/// name subcommands, followed down clap's tree (`knit stream serve …` → `knit stream serve
/// [OPTIONS] <NAME>`).
fn invoked_usage() -> Option<String> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    // Gives every subcommand its whole name (`knit stream serve`).
    cmd.build();
    for arg in std::env::args_os().skip(1) {
        let Some(arg) = arg.to_str() else { continue };
        let Some(sub) = cmd.find_subcommand(arg).cloned() else {
            continue;
        };
        cmd = sub;
    }
    let path = cmd.get_bin_name().map(str::to_string);
    let usage = cmd.render_usage().to_string();
    let usage = usage.strip_prefix("Usage: ").unwrap_or(&usage).trim();
    let usage = usage.split_whitespace().collect::<Vec<_>>().join(" ");
    Some(match path {
        Some(p) if !usage.starts_with(&p) => format!("{p} {usage}"),
        _ => usage,
    })
}

/// `what (usage: USAGE; see --help)`, as [`one_line_usage_error`] writes clap's own.
fn with_usage(what: &str, usage: &str) -> String {
    if usage.is_empty() {
        format!("{what} (see --help)")
    } else {
        format!("{what} (usage: {usage}; see --help)")
    }
}

fn run(cli: Cli) -> CliResult {
    let socket = knit::control::resolve_socket_path(cli.gateway.as_deref());
    match cli.cmd {
        Cmd::Gateway(args) => gateway(socket, args),
        Cmd::Methods { json } => methods(&connect(&socket, cli.app.as_deref(), "knit-cli")?, json),
        Cmd::Invoke {
            method,
            args,
            target,
            wait_ms,
            timeout_ms,
        } => {
            // Parse first: bad input is exit 8 even when no gateway runs.
            let args = match args {
                Some(a) => parse_json_arg(&a)?,
                None => Value::map(),
            };
            let client = connect(&socket, cli.app.as_deref(), "knit-cli")?;
            invoke(&client, &method, args, &target, wait_ms, timeout_ms)
        }
        Cmd::Serve {
            method,
            echo,
            reply,
            delay_ms,
            wait,
        } => {
            let reply = match reply {
                Some(r) if !echo => Some(parse_json_arg(&r)?),
                _ => None,
            };
            let wait = WaitStrategy::parse(&wait).ok_or_else(|| {
                CliError::new(
                    Status::InvalidArgument,
                    format!("bad --wait {wait:?}: spin, park, or spin-then-park[:MICROS]"),
                )
            })?;
            let client = Client::builder(cli.app.as_deref().unwrap_or("knit-serve"))
                .socket(&socket)
                .wait_strategy(wait)
                .connect()?;
            serve(&client, &method, reply, delay_ms)
        }
        Cmd::Ctx { cmd } => ctx(&socket, cli.app.as_deref(), cmd),
        Cmd::Stream { cmd } => stream(&socket, cli.app.as_deref(), cmd),
        Cmd::Pub {
            topic,
            json,
            routing_key,
        } => {
            let data = parse_json_arg(&json)?;
            let client = connect(&socket, cli.app.as_deref(), "knit-cli")?;
            let opts = knit::client::PublishOptions {
                routing_key,
                target: None,
            };
            Ok(client.publish(&topic, data, &opts)?)
        }
        Cmd::Sub {
            topic,
            routing_key,
            count,
        } => {
            let client = connect(&socket, cli.app.as_deref(), "knit-cli")?;
            let (tx, rx) = outq::channel();
            let opts = knit::client::SubscribeOptions {
                routing_key,
                source: None,
            };
            let _sub = client.subscribe(&topic, opts, move |m| {
                out_send(
                    &tx,
                    Value::object([
                        ("topic", Value::from(&*m.topic)),
                        ("data", m.data.clone()),
                        ("source", m.source.to_value()),
                    ]),
                );
            })?;
            errln!(
                "{}",
                Value::object([("ready", Value::from(true))]).to_json_string()
            );
            print_lines(&client, rx, count)
        }
        Cmd::Token => {
            let path = knit::bridge::token_path(&socket);
            let token = knit::bridge::read_token(&socket).map_err(|e| {
                // A gateway that answers but left no token runs without its bridge (`--no-ws`,
                // `"enabled": false`, or its default address was taken).
                let why = if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                    format!(
                        "the gateway on {} runs without its WebSocket bridge (--no-ws, \
                         \"enabled\": false, or its address was taken: see its log)",
                        socket.display()
                    )
                } else {
                    "start `knit gateway` first".to_string()
                };
                CliError::new(
                    Status::GatewayUnreachable,
                    format!("no bridge token at {} ({e}); {why}", path.display()),
                )
            })?;
            outln!("{token}");
            Ok(())
        }
        Cmd::Bench(args) => bench::run(args),
        Cmd::BenchPeer(args) => bench::peer(args),
        Cmd::WsRelay(args) => bench::relay::run(args),
        Cmd::Keeper { socket, linger_ms } => {
            knit::keeper::run(&socket, Duration::from_millis(linger_ms))
                .map_err(|e| CliError::new(Status::Internal, e.to_string()))
        }
    }
}

fn connect(
    socket: &std::path::Path,
    app: Option<&str>,
    default_app: &str,
) -> Result<Client, CliError> {
    Client::builder(app.unwrap_or(default_app))
        .socket(socket)
        .connect()
        .map_err(|e| match e.status() {
            // A gateway that takes the connection but never answers the hello (stopped, or
            // stuck) is as unreachable as one that is not there: exit 6, not 4.
            Status::Timeout => CliError::new(
                Status::GatewayUnreachable,
                format!("the gateway at {} did not answer: {e}", socket.display()),
            ),
            _ => e.into(),
        })
}

/// A JSON argument: literal text, `@FILE`, or `-` (standard input). Invalid JSON is exit 8.
fn parse_json_arg(arg: &str) -> Result<Value, CliError> {
    let text = if arg == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| CliError::new(Status::BadInput, format!("reading standard input: {e}")))?;
        s
    } else if let Some(path) = arg.strip_prefix('@') {
        std::fs::read_to_string(path)
            .map_err(|e| CliError::new(Status::BadInput, format!("reading {path}: {e}")))?
    } else {
        arg.to_string()
    };
    parse_json(&text).map_err(|e| CliError::new(Status::BadInput, format!("invalid JSON: {e}")))
}

/// JSON text as a value, nested as deep as the store takes it ([`knit::wire::value::MAX_DEPTH`]
/// levels of arrays and objects), so that whatever `ctx get` prints can be set again.
/// serde_json's own limit (127 levels) is lifted; `Value`'s parser refuses anything deeper
/// than the store's limit before descending into it, which bounds the recursion.
fn parse_json(text: &str) -> Result<Value, serde_json::Error> {
    use serde::Deserialize;
    let mut de = serde_json::Deserializer::from_str(text);
    de.disable_recursion_limit();
    let v = Value::deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

fn print_json(v: &Value) {
    outln!("{}", v.to_json_string());
}

/// Writes one line of output. When the reader has gone (`knit sub … | head -1`) nobody is left
/// to tell: the command ends at once with 0. Any other failure to write ends it with 1.
pub(crate) fn out_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o
        .write_fmt(line)
        .and_then(|()| o.write_all(b"\n"))
        .and_then(|()| o.flush())
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        errln!("knit: cannot write the output: {e}");
        std::process::exit(1);
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct GatewayFile {
    max_payload: Option<u64>,
    lane_capacity: Option<usize>,
    max_peers: Option<usize>,
    max_methods_per_peer: Option<usize>,
    max_contexts: Option<usize>,
    max_contexts_per_user: Option<usize>,
    max_bus_subs_per_peer: Option<usize>,
    max_pending_calls: Option<usize>,
    queue_depth: Option<usize>,
    channels: Option<Vec<knit::gateway::channels::ChannelDef>>,
    channel_restrictions: Option<Vec<knit::gateway::channels::ChannelRestriction>>,
    /// Read straight from the text (not through a `Value`), so a key given twice is refused.
    policy: Option<knit::model::policy::Policy>,
    bridge: Option<BridgeFile>,
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

/// The `bridge` section of the gateway configuration (docs/bridge.md).
#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct BridgeFile {
    enabled: Option<bool>,
    ws: Option<String>,
    auth: Option<String>,
    origins: Vec<String>,
    users: Vec<UserFile>,
    allow_remote: bool,
    max_frame: Option<usize>,
    max_queued_bytes: Option<usize>,
    max_waiting_bytes: Option<usize>,
    max_method_bytes: Option<usize>,
    max_identity_bytes: Option<usize>,
    max_connections: Option<usize>,
    max_pending_logins: Option<usize>,
    hello_timeout_ms: Option<u64>,
    inactive_timeout_ms: Option<u64>,
    spin_us: Option<u64>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UserFile {
    login: String,
    password: Option<String>,
    password_sha256: Option<String>,
    user: Option<String>,
}

/// A setting from the file (or the command line), if given.
fn set<T>(dst: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *dst = v;
    }
}

fn bridge_file_ws(file: &Option<BridgeFile>) -> Option<&str> {
    file.as_ref().and_then(|f| f.ws.as_deref())
}

fn bridge_config(
    file: Option<BridgeFile>,
    args: &GatewayArgs,
) -> Result<Option<knit::bridge::BridgeConfig>, CliError> {
    let bad = |m: String| CliError::new(Status::InvalidArgument, m);
    let file = file.unwrap_or_default();
    if args.no_ws || (file.enabled == Some(false) && args.ws.is_none()) {
        return Ok(None);
    }
    let addr = args
        .ws
        .as_deref()
        .or(file.ws.as_deref())
        .unwrap_or(knit::bridge::DEFAULT_ADDR);
    let addr: std::net::SocketAddr = addr.parse().map_err(|_| {
        bad(format!(
            "--ws {addr:?}: expected IP:PORT, e.g. 127.0.0.1:8385"
        ))
    })?;
    let mut cfg = knit::bridge::BridgeConfig::new(addr);
    if let Some(mode) = args.ws_auth.as_deref().or(file.auth.as_deref()) {
        cfg.auth = mode
            .parse()
            .map_err(|_| bad("--ws-auth must be token or open".into()))?;
    }
    // An origin is a scheme, a host and a port, nothing after (what a browser sends): one
    // with a path or a trailing slash would never match, silently.
    for o in &file.origins {
        let after_scheme = o.split_once("://").map(|(_, rest)| rest);
        if o != "*" && (after_scheme.is_none() || after_scheme.is_some_and(|r| r.contains('/'))) {
            return Err(bad(format!(
                "bridge.origins: {o:?} is not an origin (scheme://host[:port], no path), \
                 or \"*\""
            )));
        }
    }
    cfg.origins = file.origins;
    cfg.allow_remote = file.allow_remote;
    cfg.max_frame = file.max_frame;
    set(&mut cfg.max_queued_bytes, file.max_queued_bytes);
    set(&mut cfg.max_waiting_bytes, file.max_waiting_bytes);
    set(&mut cfg.max_method_bytes, file.max_method_bytes);
    set(&mut cfg.max_identity_bytes, file.max_identity_bytes);
    set(&mut cfg.max_connections, file.max_connections);
    if let Some(v) = file.max_pending_logins {
        if v == 0 {
            return Err(bad("bridge.max_pending_logins must be at least 1".into()));
        }
        cfg.max_pending_logins = v;
    }
    set(
        &mut cfg.hello_timeout,
        file.hello_timeout_ms.map(Duration::from_millis),
    );
    set(&mut cfg.spin, file.spin_us.map(Duration::from_micros));
    set(
        &mut cfg.inactive_timeout,
        file.inactive_timeout_ms.map(Duration::from_millis),
    );
    for u in file.users {
        let password = match (u.password, u.password_sha256) {
            (Some(p), None) => knit::bridge::Password::Plain(p),
            (None, Some(h)) => knit::bridge::Password::sha256_hex(&h).ok_or_else(|| {
                bad(format!(
                    "user {:?}: password_sha256 must be 64 hex digits",
                    u.login
                ))
            })?,
            _ => {
                return Err(bad(format!(
                    "user {:?}: give exactly one of password and password_sha256",
                    u.login
                )))
            }
        };
        cfg.users.push(knit::bridge::UserEntry {
            user: u.user.unwrap_or_else(|| u.login.clone()),
            login: u.login,
            password,
        });
    }
    Ok(Some(cfg))
}

fn gateway(socket: PathBuf, args: GatewayArgs) -> CliResult {
    knit::log::set_default_level(knit::log::Level::Info);
    // One descriptor per peer, lane and context: 10 000 contexts need more than a 1024 soft
    // limit (docs/load.md).
    if let Err(e) = knit::sys::limits::raise_nofile() {
        errln!("knit: warning: cannot raise the open-file limit: {e}");
    }
    let mut cfg = GatewayConfig::new(socket);
    let mut bridge_file = None;
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CliError::new(Status::BadInput, format!("reading {}: {e}", path.display()))
        })?;
        let f: GatewayFile = serde_json::from_str(&text)
            .map_err(|e| CliError::new(Status::BadInput, format!("{}: {e}", path.display())))?;
        set(&mut cfg.limits.max_payload, f.max_payload);
        set(&mut cfg.limits.lane_capacity, f.lane_capacity);
        set(&mut cfg.limits.max_peers, f.max_peers);
        set(&mut cfg.limits.max_methods_per_peer, f.max_methods_per_peer);
        set(&mut cfg.limits.max_contexts, f.max_contexts);
        set(
            &mut cfg.limits.max_contexts_per_user,
            f.max_contexts_per_user,
        );
        set(
            &mut cfg.limits.max_bus_subs_per_peer,
            f.max_bus_subs_per_peer,
        );
        set(&mut cfg.limits.max_pending_calls, f.max_pending_calls);
        set(&mut cfg.queue_depth, f.queue_depth);
        set(&mut cfg.channels.channels, f.channels);
        set(&mut cfg.channels.restrictions, f.channel_restrictions);
        if let Some(p) = f.policy {
            cfg.policy = p;
        }
        bridge_file = f.bridge;
        for k in f.other.keys() {
            errln!(
                "knit: warning: {}: unknown setting {k:?} ignored",
                path.display()
            );
        }
    }
    set(&mut cfg.limits.max_payload, args.max_payload);
    if let Some(path) = &args.policy {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CliError::new(Status::BadInput, format!("reading {}: {e}", path.display()))
        })?;
        cfg.policy = knit::model::policy::Policy::from_json_str(&text)
            .map_err(|e| CliError::new(Status::BadInput, format!("{}: {e}", path.display())))?;
    }
    if !cfg.policy.is_open() {
        errln!("knit: access-control policy in force");
    }
    if !args.no_keeper {
        let program = std::env::current_exe().map_err(|e| {
            CliError::new(
                Status::Internal,
                format!("locating the knit executable: {e}"),
            )
        })?;
        let mut k = knit::keeper::KeeperConfig::new(program);
        if let Some(secs) = args.keeper_linger {
            k.linger = Duration::try_from_secs_f64(secs).map_err(|_| {
                CliError::new(
                    Status::InvalidArgument,
                    "--keeper-linger must be a number of seconds",
                )
            })?;
        }
        cfg.keeper = Some(k);
    }
    if !cfg.limits.lane_capacity.is_power_of_two() || cfg.limits.lane_capacity < knit::shm::MIN_RING
    {
        return Err(CliError::new(
            Status::InvalidArgument,
            "lane_capacity must be a power of two >= 4096",
        ));
    }
    // The default address is a convenience: when it is taken (another user's gateway, a test
    // running in parallel) the gateway still serves native peers, with a warning. An address
    // that was asked for must be had.
    let default_addr = args.ws.is_none() && bridge_file_ws(&bridge_file).is_none();
    cfg.bridge = bridge_config(bridge_file, &args)?;
    let gw = match Gateway::bind(cfg.clone()) {
        Err(knit::gateway::GatewayError::Bridge(e @ knit::bridge::BridgeError::Bind { .. }))
            if default_addr =>
        {
            errln!("knit: warning: {e}; running without the WebSocket bridge");
            cfg.bridge = None;
            Gateway::bind(cfg)
        }
        other => other,
    }
    .map_err(|e| CliError::new(e.status(), e.to_string()))?;
    gw.run_until(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
    })
    .map_err(|e| CliError::new(e.status(), e.to_string()))
}

impl From<knit::client::ContextError> for CliError {
    fn from(e: knit::client::ContextError) -> Self {
        CliError::new(e.status(), e.to_string())
    }
}

/// How long a long-running tool (`serve`, `sub`, `ctx watch`, `stream …`) waits for a gateway
/// that vanished without stopping cleanly to come back, before it gives up (exit 6).
const RECONNECT_GRACE: Duration = Duration::from_secs(60);

/// Whether a long-running tool goes on: while connected, and while a gateway that crashed may
/// still come back (the client reconnects by itself and restores what it had); exit 6 once the
/// gateway stopped cleanly, or stayed away longer than [`RECONNECT_GRACE`].
fn still_served(client: &Client) -> CliResult {
    use knit::client::ConnectionState;
    match client.connection_state() {
        ConnectionState::Connected => Ok(()),
        ConnectionState::Disconnected {
            since,
            gateway_stopped,
            ..
        } if !gateway_stopped && since.elapsed() < RECONNECT_GRACE => Ok(()),
        ConnectionState::Disconnected {
            gateway_stopped: false,
            ..
        } => Err(CliError::new(
            Status::Disconnected,
            format!(
                "the gateway did not come back within {} s",
                RECONNECT_GRACE.as_secs()
            ),
        )),
        _ => Err(CliError::new(
            Status::Disconnected,
            "the gateway closed the connection",
        )),
    }
}

/// What a subscription's callback hands to the printing thread.
enum Out {
    /// One line of output (JSON text).
    Line(String),
    /// A stream subscription ended, for this reason.
    Closed(String),
}

/// Hands `line` to the printer, waiting while its queue is full (a reader that does not keep up
/// slows the subscription down instead of growing this process; [`outq`]). A printer that
/// stopped (its loop ended) drops the line.
fn out_send(tx: &outq::Sender<Out>, line: Value) {
    let text = line.to_json_string();
    let n = text.len();
    let _ = tx.send(Out::Line(text), n);
}

/// Prints lines from `rx` until `count` were printed (or forever), failing if the gateway goes
/// or a stream subscription is closed. Takes `rx` by value: it is dropped on every way out,
/// which releases a callback waiting for room, before the subscription is dropped.
fn print_lines(client: &Client, rx: outq::Receiver<Out>, count: Option<u64>) -> CliResult {
    let mut printed = 0u64;
    while count.is_none_or(|c| printed < c) {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Out::Line(line)) => {
                outln!("{line}");
                printed += 1;
            }
            Ok(Out::Closed(reason)) => return Err(stream_closed(client, &reason)),
            Err(outq::RecvError::Timeout) => still_served(client)?,
            Err(outq::RecvError::Disconnected) => break,
        }
    }
    Ok(())
}

/// Why a stream subscription ended, for its exit code.
fn stream_closed(client: &Client, reason: &str) -> CliError {
    // Its server may have stopped with the gateway, before our connection closed: that is the
    // gateway's clean stop (exit 6), not a lost server.
    if client.gateway_stopping() {
        return CliError::new(Status::Disconnected, "the gateway closed the connection");
    }
    // Exit 5 (the exit codes are a contract), with the reason: "slow consumer" when our
    // output was not read fast enough.
    let why = if reason.is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    };
    CliError::new(
        Status::PeerLeft,
        format!("the stream was closed by its server{why}"),
    )
}

fn stream(socket: &std::path::Path, app: Option<&str>, cmd: StreamCmd) -> CliResult {
    use knit::client::{StreamEvent, StreamOptions, StreamParams};
    match cmd {
        StreamCmd::Serve { name, rate } => {
            // The period must be a duration too (`--rate 1e-300` is positive, but one push
            // every 1e300 s is not a time this machine can wait for).
            let period = (rate > 0.0 && rate.is_finite())
                .then(|| Duration::try_from_secs_f64(1.0 / rate).ok())
                .flatten()
                .ok_or_else(|| {
                    CliError::new(
                        Status::InvalidArgument,
                        "--rate must be a positive number of pushes per second whose period \
                         (1/rate seconds) is representable",
                    )
                })?;
            let client = connect(socket, app, "knit-stream")?;
            let stream = client.create_stream(name.as_str(), StreamOptions::default())?;
            let me = client.instance();
            print_json(&Value::object([
                ("ready", Value::from(true)),
                ("stream", Value::from(name.as_str())),
                ("application", Value::from(me.application.as_str())),
                ("instance", Value::from(me.instance.as_str())),
                ("pid", Value::from(me.pid)),
                ("peerId", Value::from(me.peer_id.to_string())),
            ]));
            let start = std::time::Instant::now();
            let mut seq = 0u64;
            loop {
                still_served(&client)?;
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                stream.push(Value::object([
                    ("seq", Value::from(seq)),
                    ("time", Value::from(now_ms)),
                ]))?;
                seq += 1;
                // Keep the rate on average: sleep until the next slot (none when it lies beyond
                // what the clock can represent), a little at a time so that a gateway that
                // stops is noticed at any rate.
                let next = Duration::try_from_secs_f64(period.as_secs_f64() * seq as f64)
                    .ok()
                    .and_then(|d| start.checked_add(d));
                loop {
                    let left = match next {
                        Some(n) => n.saturating_duration_since(std::time::Instant::now()),
                        None => Duration::MAX,
                    };
                    if left.is_zero() {
                        break;
                    }
                    std::thread::sleep(left.min(Duration::from_millis(200)));
                    still_served(&client)?;
                }
            }
        }
        StreamCmd::Sub {
            name,
            count,
            wait_ms,
            args,
        } => {
            let arguments = match args {
                Some(a) => parse_json_arg(&a)?,
                None => Value::map(),
            };
            let client = connect(socket, app, "knit-cli")?;
            let (tx, rx) = outq::channel();
            let stream_name = name.clone();
            let params = StreamParams {
                arguments,
                wait: Duration::from_millis(wait_ms),
                ..Default::default()
            };
            let _sub = client
                .subscribe_stream(&name, params, move |e| match e {
                    StreamEvent::Data { data, server, .. } => out_send(
                        &tx,
                        Value::object([
                            ("stream", Value::from(stream_name.as_str())),
                            ("data", data.clone()),
                            ("source", server.to_value()),
                        ]),
                    ),
                    StreamEvent::Closed { reason, .. } => {
                        let _ = tx.send(Out::Closed(reason.clone()), 0);
                    }
                })
                .map_err(|e| CliError::new(e.status(), e.to_string()))?;
            errln!(
                "{}",
                Value::object([("ready", Value::from(true))]).to_json_string()
            );
            print_lines(&client, rx, count)
        }
    }
}

fn version_json(v: u64) {
    print_json(&Value::object([("version", Value::from(v))]));
}

fn ctx(socket: &std::path::Path, app: Option<&str>, cmd: CtxCmd) -> CliResult {
    // Parse JSON before connecting: bad input is exit 8 even without a gateway.
    let parsed = match &cmd {
        CtxCmd::Set { json, .. } | CtxCmd::Update { json, .. } | CtxCmd::SetPath { json, .. } => {
            Some(parse_json_arg(json)?)
        }
        _ => None,
    };
    let client = connect(socket, app, "knit-cli")?;
    let ctx = client.contexts();
    match cmd {
        CtxCmd::Get { name } => print_json(&ctx.get(&name)?.data),
        CtxCmd::Set { name, .. } => version_json(ctx.set(&name, parsed.unwrap_or_default())?),
        CtxCmd::Update { name, .. } => version_json(ctx.update(&name, parsed.unwrap_or_default())?),
        CtxCmd::SetPath { name, path, .. } => {
            version_json(ctx.set_path(&name, &path, parsed.unwrap_or_default())?)
        }
        CtxCmd::Destroy { name } => ctx.destroy(&name)?,
        CtxCmd::List => print_json(&Value::Array(
            ctx.all().into_iter().map(Value::from).collect(),
        )),
        CtxCmd::Watch { name, count } => {
            let (tx, rx) = outq::channel();
            let _sub = ctx.subscribe(&name, move |u| {
                let updater = u.updater.as_ref().map(|i| {
                    Value::object([
                        ("application", Value::from(i.application.as_str())),
                        ("instance", Value::from(i.instance.as_str())),
                        ("peerId", Value::from(i.peer_id.to_string())),
                    ])
                });
                let mut line = knit::wire::Map::new();
                line.insert("name".into(), Value::from(&*u.name));
                line.insert("data".into(), (*u.data).clone());
                line.insert("delta".into(), u.delta.clone());
                line.insert(
                    "removed".into(),
                    Value::Array(u.removed.iter().map(|s| Value::from(s.as_str())).collect()),
                );
                line.insert("version".into(), Value::from(u.version));
                line.insert("updater".into(), updater.into());
                if u.conflated {
                    line.insert("conflated".into(), Value::from(true));
                }
                out_send(&tx, Value::Map(line));
            })?;
            errln!(
                "{}",
                Value::object([("ready", Value::from(true))]).to_json_string()
            );
            print_lines(&client, rx, count)?;
        }
    }
    Ok(())
}

fn methods(client: &Client, json: bool) -> CliResult {
    let mut ms = client.methods();
    ms.sort_by(|a, b| a.def.name.cmp(&b.def.name));
    if json {
        print_json(&Value::Array(
            ms.iter().map(knit::client::MethodInfo::to_value).collect(),
        ));
    } else {
        outln!("{:<32} {:<24} {:>8}  PEER", "METHOD", "APPLICATION", "PID");
        for m in &ms {
            for s in &m.servers {
                outln!(
                    "{:<32} {:<24} {:>8}  {}",
                    m.def.name,
                    s.application,
                    s.pid,
                    s.peer_id
                );
            }
        }
    }
    Ok(())
}

fn invoke(
    client: &Client,
    method: &str,
    args: Value,
    target: &str,
    wait_ms: u64,
    timeout_ms: u64,
) -> CliResult {
    let opts = InvokeOptions {
        target: Target::parse_cli(target),
        wait: Duration::from_millis(wait_ms),
        timeout: Duration::from_millis(timeout_ms),
    };
    match client.invoke(method, args, &opts) {
        Ok(r) => {
            print_json(&r.to_value());
            Ok(())
        }
        Err(InvokeError::Failed(r)) => {
            print_json(&r.to_value());
            Err(CliError::new(r.failure_status(), r.message.clone()))
        }
        Err(e) => Err(CliError::new(e.status(), e.to_string())),
    }
}

fn serve(client: &Client, method: &str, reply: Option<Value>, delay_ms: u64) -> CliResult {
    let delay = Duration::from_millis(delay_ms);
    // Delayed answers wait on one thread, in arrival order (every call waits as long, so that
    // is deadline order too). A thread per call ran the process out of threads and memory
    // when callers piled up tens of thousands of calls on a slow server.
    let delayed = (!delay.is_zero()).then(|| {
        let (tx, rx) = std::sync::mpsc::channel::<(std::time::Instant, Responder, Value)>();
        std::thread::Builder::new()
            .name("knit-serve-delay".into())
            .spawn(move || {
                for (due, responder, result) in rx {
                    std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
                    responder.ok(result);
                }
            })
            .map(|_| tx)
    });
    let delayed = delayed
        .transpose()
        .map_err(|e| CliError::new(Status::Busy, format!("cannot start the delay thread: {e}")))?;
    client.register_async(method, move |call, responder| {
        let result = reply.clone().unwrap_or(call.args);
        match &delayed {
            None => responder.ok(result),
            Some(tx) => {
                let due = std::time::Instant::now() + delay;
                // The thread ends only with the process; if it is gone, the responder is
                // dropped with the item, which answers the caller with an error.
                let _ = tx.send((due, responder, result));
            }
        }
    })?;
    let me = client.instance();
    print_json(&Value::object([
        ("ready", Value::from(true)),
        ("method", Value::from(method)),
        ("application", Value::from(me.application.as_str())),
        ("instance", Value::from(me.instance.as_str())),
        ("pid", Value::from(me.pid)),
        ("peerId", Value::from(me.peer_id.to_string())),
    ]));
    // Serve until killed, or until the gateway stops (or crashes and does not come back).
    loop {
        still_served(client)?;
        std::thread::sleep(Duration::from_millis(200));
    }
}
