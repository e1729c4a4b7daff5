//! The same device through real Linux kernels: the conformance suite, random sequences and the
//! traces shipped with userblk-harness, through `/dev/nbdN`. Plain `cargo test` skips it ("not
//! root" / "the nbd module is not loaded"); `userblk vm -- cargo test` runs it in a VM per test
//! kernel.

use blockdev_template::PageDisk;

#[test]
fn on_real_kernels() {
    userblk_harness::kernel_test::run(|| PageDisk::new(64 << 20)).assert_passed();
}
