//! userblk-harness: what a driver author runs against their [`userblk::BlockDevice`] to know it
//! is right: scripted request streams, a conformance suite, real-kernel traces and a
//! crash-consistency checker, through the loopback fake kernel or a real `/dev/nbdN`.

pub mod cli;
pub mod conformance;
pub mod crash;
pub mod factory;
pub mod jitter;
pub mod kernel_test;
pub mod nbd_rig;
pub mod net_rig;
pub mod node_target;
pub mod random;
pub mod script;
pub mod spec;
pub mod target;
pub mod trace;
pub mod ublk_rig;
pub mod vm;

/// The driver author's guide (`harness/README.md`); its examples run as doc tests.
#[doc = include_str!("../README.md")]
pub mod guide {}
