//! The same device through real Linux kernels: the conformance suite, random sequences and the
//! traces shipped with userblk-harness, through `/dev/nbdN`. Plain `cargo test` skips it ("not
//! root" / "the nbd module is not loaded"); `userblk vm -- cargo test` runs it in a VM per test
//! kernel.

use std::sync::Arc;

use blockdev_template::PageDisk;
use userblk_harness::factory::Reopen;

#[test]
fn on_real_kernels() {
    // Re-openable: the durability cases serve the same disk again after a clean disconnect.
    let factory = Reopen::new(
        || Ok(Arc::new(PageDisk::new(64 << 20))),
        |disk: &Arc<PageDisk>| Ok(Arc::clone(disk)),
    );
    userblk_harness::kernel_test::run(factory).assert_passed();
}
