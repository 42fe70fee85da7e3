//! `bdev::io::set_pool_size` (`bdev_set_options`'s `bdev_io_pool_size`)
//! sizes every reactor's IO descriptor pool, and only before the first pool
//! exists: a pool never changes under IO. Its own test binary, so no other
//! test built a pool first.

use bdev::io::{pool_size, set_pool_size, IoBox, DEFAULT_IO_POOL_SIZE};

#[test]
fn the_pool_size_applies_to_new_pools_and_is_fixed_once_one_exists() {
    assert_eq!(pool_size(), DEFAULT_IO_POOL_SIZE);
    assert!(set_pool_size(0).is_err());
    set_pool_size(300).unwrap();
    assert_eq!(pool_size(), 300);
    let m = reactor::ReactorSet::manual(1);
    m.on(0, || {
        assert_eq!(IoBox::capacity(), 300);
        let held: Vec<IoBox> = (0..300).map(|_| IoBox::alloc().expect("within the pool")).collect();
        assert!(IoBox::alloc().is_none(), "the 301st descriptor does not exist");
        drop(held);
    });
    assert!(set_pool_size(1000).is_err(), "a built pool is never resized");
    assert_eq!(pool_size(), 300);
}
