//! The `userblk` command line: one module per subcommand, wired together in `src/main.rs`.

pub mod check;
pub mod check_nbd;
pub mod measured;
pub mod record;
pub mod replay;
pub mod serve;
pub mod serve_ublk;
pub mod vm;
