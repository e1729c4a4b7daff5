//! The `userblk` command line: one module per subcommand, wired together in `src/main.rs`.

pub mod check;
pub mod check_nbd;
pub mod disconnect;
pub mod measured;
pub mod record;
pub mod replay;
pub mod serve;
pub mod serve_ublk;
pub mod ublk_setup;
pub mod vm;
