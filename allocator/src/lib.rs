//! The global allocator of `trimtab-sidecar` and `trimtab-bots`: mimalloc, called the
//! way its own C API expects.
//!
//! Why not the `mimalloc` crate's `MiMalloc`: it passes every allocation to
//! `mi_malloc_aligned`, even when the alignment is the 8 or 16 bytes every mimalloc
//! block has anyway. In mimalloc 3 that call takes a fast path only while the size
//! class's page has a free block at hand; otherwise, for any size whose block is not
//! a power of two (336 or 280 bytes, say), it falls back to over-allocating: a bigger
//! block from another size class, found the slow way. The proxy hit that fallback
//! about 1.4 times per request (callgrind, `bench/proxy-instructions.sh`; upstream:
//! purpleprotocol/mimalloc_rust#170, microsoft/mimalloc#889).
//!
//! Here a layout whose alignment every block of its size already has goes to plain
//! `mi_malloc`, `mi_zalloc` and `mi_realloc`, as Rust's own `System` allocator does
//! with glibc `malloc`; only over-aligned layouts (tokio's 128-byte cache-padded
//! cells) take the aligned calls.

use std::{
    alloc::{GlobalAlloc, Layout},
    ffi::c_void,
};

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};

/// mimalloc's guaranteed alignment (`MI_MAX_ALIGN_SIZE`, the alignment of
/// `max_align_t`): its size classes above 16 bytes are multiples of 16, those below
/// multiples of 8, and every page's first block is 16-aligned.
const PLAIN_ALIGN: usize = 16;

/// The allocator; install it with `#[global_allocator]`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Allocator;

/// Whether a plain allocation of `size` bytes is aligned enough for `align`: when
/// `size` is a non-zero multiple of an alignment of at most 16, mimalloc's size class
/// for it is a multiple of that alignment too (its classes are 1 to 8 words, then
/// even numbers of words), so every block is aligned. Anything else (a zero size, a
/// size that is not a multiple, an alignment above 16) takes the aligned call.
fn plain(align: usize, size: usize) -> bool {
    align <= PLAIN_ALIGN && size != 0 && size.is_multiple_of(align)
}

#[allow(unsafe_code)]
// SAFETY (the whole impl): every pointer returned comes from mimalloc with at least
// the layout's size and alignment, or is null on failure; every pointer freed or
// reallocated was returned by this allocator (GlobalAlloc's contract), and mimalloc
// frees plain and aligned blocks alike with `mi_free` and resizes them with either
// realloc.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: see the impl.
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if plain(layout.align(), new_size) {
                mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;

    const ALIGNS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 4096];

    /// Every size up to a few pages, and every alignment from 1 to a page: whichever
    /// call a layout takes, the block is aligned, holds its bytes through a realloc
    /// and is zeroed when asked.
    #[test]
    fn every_layout_gets_an_aligned_block_that_keeps_its_bytes() {
        let allocator = Allocator;
        for align in ALIGNS {
            for size in (1..=300).chain((301..=9000).step_by(97)) {
                let layout = Layout::from_size_align(size, align).expect("a valid layout");
                // SAFETY: a non-zero layout; the block is written within its size,
                // then freed once with the layout it was allocated with.
                unsafe {
                    let block = allocator.alloc(layout);
                    assert!(!block.is_null(), "{layout:?}");
                    assert_eq!(block as usize % align, 0, "{layout:?}");
                    block.write_bytes(0xA5, size);
                    let grown = allocator.realloc(block, layout, size * 2);
                    assert_eq!(grown as usize % align, 0, "{layout:?} grown");
                    assert!((0..size).all(|i| *grown.add(i) == 0xA5), "{layout:?} grown");
                    let grown_layout = Layout::from_size_align(size * 2, align).expect("valid");
                    let shrunk = allocator.realloc(grown, grown_layout, size);
                    assert_eq!(shrunk as usize % align, 0, "{layout:?} shrunk");
                    assert!(
                        (0..size).all(|i| *shrunk.add(i) == 0xA5),
                        "{layout:?} shrunk"
                    );
                    allocator.dealloc(shrunk, layout);

                    let zeroed = allocator.alloc_zeroed(layout);
                    assert_eq!(zeroed as usize % align, 0, "{layout:?} zeroed");
                    assert!((0..size).all(|i| *zeroed.add(i) == 0), "{layout:?} zeroed");
                    allocator.dealloc(zeroed, layout);
                }
            }
        }
    }

    /// Many live blocks of one odd size at once, as a proxy under load holds them:
    /// every one aligned and distinct.
    #[test]
    fn many_live_blocks_of_an_odd_size_stay_aligned_and_apart() {
        let allocator = Allocator;
        for (size, align) in [(336, 8), (280, 8), (48, 16), (24, 8), (1072, 16)] {
            let layout = Layout::from_size_align(size, align).expect("a valid layout");
            // SAFETY: as above; each block is freed once.
            unsafe {
                let mut blocks: Vec<*mut u8> = (0..2000).map(|_| allocator.alloc(layout)).collect();
                for (i, block) in blocks.iter().enumerate() {
                    assert_eq!(*block as usize % align, 0, "{layout:?}");
                    block.write_bytes(i as u8, size);
                }
                for (i, block) in blocks.iter().enumerate() {
                    assert!((0..size).all(|j| *block.add(j) == i as u8), "{layout:?}");
                }
                blocks.sort_unstable();
                blocks.dedup();
                assert_eq!(blocks.len(), 2000);
                for block in blocks {
                    allocator.dealloc(block, layout);
                }
            }
        }
    }

    #[test]
    fn only_layouts_every_block_satisfies_go_plain() {
        assert!(plain(8, 336));
        assert!(plain(16, 48));
        assert!(plain(1, 1));
        assert!(!plain(32, 64), "over-aligned");
        assert!(!plain(128, 1920), "tokio's cache-padded cells");
        assert!(!plain(8, 4), "smaller than its alignment");
        assert!(!plain(16, 40), "not a multiple of its alignment");
        assert!(!plain(1, 0), "zero-sized");
    }
}
