//! userblk-harness: scripted request streams, a conformance suite, traces and a crash checker
//! for [`userblk`] block devices.
