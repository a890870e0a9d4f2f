//! `knit`: the gateway daemon and the command-line tools. See `knit --help`.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
