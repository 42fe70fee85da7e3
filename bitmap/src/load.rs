//! Reading a bitmap back from one member (assembly, resync, re-add): every
//! page is read and fully validated (CRC, array UUID, page index, geometry)
//! before its bits are believed.

use crate::geometry::{Geometry, WORDS_PER_PAGE};
use crate::page::decode_page;
use crate::BitmapError;
use bdev::{BdevHandle, DmaBuf, IoBox, IoType};
use std::cell::RefCell;
use std::rc::Rc;

/// A bitmap as read from a member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedBitmap {
    pub geometry: Geometry,
    /// Chunk bits, `geometry.num_words()` words.
    pub words: Vec<u64>,
    /// Smallest and largest events of its pages (only changed pages are
    /// rewritten by a batch, so they differ; the RAID compares the largest
    /// with the superblock's).
    pub events_min: u64,
    pub events_max: u64,
}

impl LoadedBitmap {
    /// Builds one from page images (tests, tools): page `i` is `pages[i]`.
    pub fn from_pages(geometry: Geometry, pages: &[&[u8]]) -> Result<LoadedBitmap, BitmapError> {
        geometry.validate()?;
        let mut lb = LoadedBitmap::empty(geometry);
        if pages.len() != geometry.num_pages() {
            return Err(BitmapError::GeometryMismatch(format!(
                "{} pages given, geometry has {}",
                pages.len(),
                geometry.num_pages()
            )));
        }
        for (i, p) in pages.iter().enumerate() {
            lb.add_page(i, p)?;
        }
        Ok(lb)
    }

    fn empty(geometry: Geometry) -> LoadedBitmap {
        LoadedBitmap { geometry, words: vec![0; geometry.num_words()], events_min: u64::MAX, events_max: 0 }
    }

    fn add_page(&mut self, index: usize, bytes: &[u8]) -> Result<(), BitmapError> {
        let page = decode_page(bytes)?;
        page.check(&self.geometry, index)?;
        let start = index * WORDS_PER_PAGE;
        for (dst, w) in self.words.iter_mut().skip(start).take(WORDS_PER_PAGE).zip(page.words()) {
            *dst = w;
        }
        self.events_min = self.events_min.min(page.events);
        self.events_max = self.events_max.max(page.events);
        Ok(())
    }

    /// Chunks whose bit is set: the regions a resync must copy.
    pub fn dirty_chunks(&self) -> impl Iterator<Item = u64> + '_ {
        crate::set_bits(&self.words)
    }

    pub fn dirty_count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn is_dirty(&self, chunk: u64) -> bool {
        let (w, bit) = ((chunk / 64) as usize, 1u64 << (chunk % 64));
        self.words.get(w).is_some_and(|x| x & bit != 0)
    }
}

type LoadDone = Box<dyn FnOnce(Result<LoadedBitmap, BitmapError>)>;

struct LoadState {
    result: Result<LoadedBitmap, BitmapError>,
    outstanding: usize,
    done: Option<LoadDone>,
}

impl LoadState {
    fn fail(&mut self, e: BitmapError) {
        if self.result.is_ok() {
            self.result = Err(e);
        }
    }
}

/// Reads the bitmap of `geometry` stored at `offset_blocks` on `member`,
/// then calls `done` (always later, on this reactor). Must run on a reactor.
pub fn load(
    member: &BdevHandle,
    geometry: Geometry,
    offset_blocks: u64,
    done: impl FnOnce(Result<LoadedBitmap, BitmapError>) + 'static,
) {
    let state = Rc::new(RefCell::new(LoadState {
        result: geometry.validate().map(|()| LoadedBitmap::empty(geometry)),
        outstanding: 0,
        done: Some(Box::new(done)),
    }));
    let finish = |state: &Rc<RefCell<LoadState>>| {
        let mut st = state.borrow_mut();
        if st.outstanding > 0 {
            return;
        }
        let Some(done) = st.done.take() else { return };
        let result = std::mem::replace(&mut st.result, Err(BitmapError::Closed));
        drop(st);
        done(result);
    };
    let name = member.name().to_string();
    let props = member.props();
    if state.borrow().result.is_ok() {
        let end = offset_blocks.checked_add(geometry.region_blocks());
        if props.block_size != geometry.block_size || end.is_none_or(|e| e > props.num_blocks) {
            state.borrow_mut().fail(BitmapError::Member(name.clone(), "does not hold the bitmap region".into()));
        }
    }
    let channel = match member.channel() {
        Ok(c) => Some(c),
        Err(e) => {
            state.borrow_mut().fail(BitmapError::Member(name.clone(), e.to_string()));
            None
        }
    };
    let ok = state.borrow().result.is_ok();
    if let (Some(ch), true) = (channel, ok) {
        let st2 = state.clone();
        let member_name = name.clone();
        let on_read: Rc<dyn bdev::IoDone> = Rc::new(move |io: IoBox| {
            let mut st = st2.borrow_mut();
            st.outstanding -= 1;
            let page = io.tag as usize;
            if !io.status.is_ok() {
                let e =
                    BitmapError::Member(member_name.clone(), format!("reading bitmap page {page}: {:?}", io.status));
                st.fail(e);
            } else if let (Some(buf), Ok(lb)) = (io.buf.as_ref(), st.result.as_mut()) {
                if let Err(e) = buf.with(|b| lb.add_page(page, b)) {
                    tracing::error!(page, "bitmap page rejected: {e}");
                    st.fail(e);
                }
            }
            drop(st);
            finish(&st2);
        });
        for page in 0..geometry.num_pages() {
            let lba = offset_blocks + page as u64 * geometry.page_blocks();
            let io = DmaBuf::alloc(geometry.page_buf_bytes())
                .and_then(|buf| IoBox::data(IoType::Read, lba, geometry.page_blocks(), Some(buf)));
            let Some(mut io) = io else {
                state.borrow_mut().fail(BitmapError::NoMemory("bitmap load buffers"));
                break;
            };
            io.tag = page as u64;
            io.set_done(on_read.clone());
            state.borrow_mut().outstanding += 1;
            ch.submit(io);
        }
    }
    if state.borrow().outstanding == 0 {
        // Nothing was submitted: still report later, as IO would.
        let st = state.clone();
        reactor::register_poller("bitmap_load_done", move || {
            finish(&st);
            reactor::PollStatus::Done
        });
    }
}
