//! Reading a bitmap back from one member (assembly, resync, re-add): every
//! page is read and fully validated (CRC, array UUID, page index, geometry)
//! before its bits are believed. The dirty plane is read first; when its
//! pages are version 2 the written plane follows, and a bitmap of version 1
//! pages counts every chunk as written.

use crate::geometry::{Geometry, Plane, WORDS_PER_PAGE};
use crate::page::{decode_page, PageKind, PAGE_VERSION};
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
    /// Chunks written since the array was created (`geometry.num_words()`
    /// words); None: version 1 pages, which do not say (every chunk counts
    /// as written, and the bitmap keeps writing version 1).
    pub written: Option<Vec<u64>>,
    /// Smallest and largest events of its pages (only changed pages are
    /// rewritten by a batch, so they differ; the RAID compares the largest
    /// with the superblock's).
    pub events_min: u64,
    pub events_max: u64,
}

impl LoadedBitmap {
    /// Builds one from the dirty plane's page images alone (tests, tools
    /// that look at the dirty bits): page `i` is `pages[i]`; `written` stays
    /// None.
    pub fn from_pages(geometry: Geometry, pages: &[&[u8]]) -> Result<LoadedBitmap, BitmapError> {
        LoadedBitmap::build(geometry, pages, None, false)
    }

    /// Builds one from page images of both planes (version 2: page `i` of
    /// the written plane is `written[i]`) or of the dirty plane alone
    /// (version 1: `written` None).
    pub fn from_planes(
        geometry: Geometry,
        dirty: &[&[u8]],
        written: Option<&[&[u8]]>,
    ) -> Result<LoadedBitmap, BitmapError> {
        LoadedBitmap::build(geometry, dirty, written, true)
    }

    fn build(
        geometry: Geometry,
        dirty: &[&[u8]],
        written: Option<&[&[u8]]>,
        complete: bool,
    ) -> Result<LoadedBitmap, BitmapError> {
        geometry.validate()?;
        let mut lb = LoadedBitmap::empty(geometry);
        let mut version = None;
        for (plane, pages) in [(Plane::Dirty, Some(dirty)), (Plane::Written, written)] {
            let Some(pages) = pages else { continue };
            if pages.len() != geometry.num_pages() {
                return Err(BitmapError::GeometryMismatch(format!(
                    "{} pages given, geometry has {}",
                    pages.len(),
                    geometry.num_pages()
                )));
            }
            for (i, p) in pages.iter().enumerate() {
                lb.add_page(plane, i, p, &mut version)?;
            }
        }
        if complete {
            lb.check_complete(version)?;
        }
        Ok(lb)
    }

    fn empty(geometry: Geometry) -> LoadedBitmap {
        LoadedBitmap {
            geometry,
            words: vec![0; geometry.num_words()],
            written: None,
            events_min: u64::MAX,
            events_max: 0,
        }
    }

    /// Adds page `index` of `plane`; every page must be of one version
    /// (`version`: the one seen so far).
    fn add_page(
        &mut self,
        plane: Plane,
        index: usize,
        bytes: &[u8],
        version: &mut Option<u32>,
    ) -> Result<(), BitmapError> {
        let page = decode_page(bytes)?;
        page.check(&self.geometry, index)?;
        let PageKind { version: v, plane: p } = page.kind;
        if p != plane || version.is_some_and(|seen| seen != v) {
            return Err(BitmapError::GeometryMismatch(format!(
                "page {index} of the {plane:?} plane is a version {v} page of the {p:?} plane"
            )));
        }
        *version = Some(v);
        let words = match plane {
            Plane::Dirty => &mut self.words,
            Plane::Written => self.written.get_or_insert_with(|| vec![0; self.geometry.num_words()]),
        };
        let start = index * WORDS_PER_PAGE;
        for (dst, w) in words.iter_mut().skip(start).take(WORDS_PER_PAGE).zip(page.words()) {
            *dst = w;
        }
        self.events_min = self.events_min.min(page.events);
        self.events_max = self.events_max.max(page.events);
        Ok(())
    }

    /// A version 2 bitmap has both planes, a version 1 bitmap only the first.
    fn check_complete(&self, version: Option<u32>) -> Result<(), BitmapError> {
        if version == Some(PAGE_VERSION) && self.written.is_none() {
            return Err(BitmapError::GeometryMismatch("a version 2 bitmap without its written plane".into()));
        }
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

    /// Whether chunk `chunk` was written since the array was created
    /// (always, for a version 1 bitmap).
    pub fn is_written(&self, chunk: u64) -> bool {
        let (w, bit) = ((chunk / 64) as usize, 1u64 << (chunk % 64));
        match &self.written {
            Some(words) => words.get(w).is_some_and(|x| x & bit != 0),
            None => chunk < self.geometry.num_chunks(),
        }
    }

    /// Chunks written since the array was created.
    pub fn written_count(&self) -> u64 {
        match &self.written {
            Some(words) => words.iter().map(|w| u64::from(w.count_ones())).sum(),
            None => self.geometry.num_chunks(),
        }
    }
}

type LoadDone = Box<dyn FnOnce(Result<LoadedBitmap, BitmapError>)>;

struct LoadState {
    result: Result<LoadedBitmap, BitmapError>,
    outstanding: usize,
    /// The version of the pages read so far.
    version: Option<u32>,
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
        version: None,
        done: Some(Box::new(done)),
    }));
    let name = member.name().to_string();
    let props = member.props();
    if state.borrow().result.is_ok() {
        // The dirty plane must be there (version 1 reserved no more).
        let end = offset_blocks.checked_add(geometry.legacy_region_blocks());
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
    match (channel, ok) {
        (Some(ch), true) => {
            let reader =
                Rc::new(PlaneReader { ch, name, geometry, offset_blocks, num_blocks: props.num_blocks, state });
            reader.read(Plane::Dirty);
        }
        _ => report_later(state),
    }
}

/// Reads one plane's pages, then the next plane or the result.
struct PlaneReader {
    ch: Rc<bdev::Channel>,
    name: String,
    geometry: Geometry,
    offset_blocks: u64,
    num_blocks: u64,
    state: Rc<RefCell<LoadState>>,
}

impl PlaneReader {
    fn read(self: &Rc<Self>, plane: Plane) {
        let g = self.geometry;
        let end = self.offset_blocks.checked_add(g.page_offset_blocks(plane, g.num_pages()));
        if end.is_none_or(|e| e > self.num_blocks) {
            self.state
                .borrow_mut()
                .fail(BitmapError::Member(self.name.clone(), "does not hold the bitmap region".into()));
            return report_later(self.state.clone());
        }
        let me = self.clone();
        let on_read: Rc<dyn bdev::IoDone> = Rc::new(move |io: IoBox| me.page_read(plane, io));
        for page in 0..g.num_pages() {
            let lba = self.offset_blocks + g.page_offset_blocks(plane, page);
            let io = DmaBuf::alloc(g.page_buf_bytes())
                .and_then(|buf| IoBox::data(IoType::Read, lba, g.page_blocks(), Some(buf)));
            let Some(mut io) = io else {
                self.state.borrow_mut().fail(BitmapError::NoMemory("bitmap load buffers"));
                break;
            };
            io.tag = page as u64;
            io.set_done(on_read.clone());
            self.state.borrow_mut().outstanding += 1;
            self.ch.submit(io);
        }
        if self.state.borrow().outstanding == 0 {
            report_later(self.state.clone());
        }
    }

    fn page_read(self: &Rc<Self>, plane: Plane, io: IoBox) {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        st.outstanding -= 1;
        let page = io.tag as usize;
        if !io.status.is_ok() {
            let e = BitmapError::Member(self.name.clone(), format!("reading bitmap page {page}: {:?}", io.status));
            st.fail(e);
        } else if let (Some(buf), Ok(lb)) = (io.buf.as_ref(), st.result.as_mut()) {
            let version = &mut st.version;
            if let Err(e) = buf.with(|b| lb.add_page(plane, page, b, version)) {
                tracing::error!(page, ?plane, "bitmap page rejected: {e}");
                st.fail(e);
            }
        }
        if st.outstanding > 0 {
            return;
        }
        let next = plane == Plane::Dirty && st.result.is_ok() && st.version == Some(PAGE_VERSION);
        drop(guard);
        if next {
            self.read(Plane::Written);
        } else {
            finish(&self.state);
        }
    }
}

fn finish(state: &Rc<RefCell<LoadState>>) {
    let mut st = state.borrow_mut();
    if st.outstanding > 0 {
        return;
    }
    let Some(done) = st.done.take() else { return };
    let version = st.version;
    let mut result = std::mem::replace(&mut st.result, Err(BitmapError::Closed));
    if let Ok(lb) = &result {
        if let Err(e) = lb.check_complete(version) {
            result = Err(e);
        }
    }
    drop(st);
    done(result);
}

/// Reports the result from a poller: `done` always runs after `load` returned.
fn report_later(state: Rc<RefCell<LoadState>>) {
    reactor::register_poller("bitmap_load_done", move || {
        finish(&state);
        reactor::PollStatus::Done
    });
}
