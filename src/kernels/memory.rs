//! Raw memory: the elements of libtorch tensors as Rust slices, their sizes read without
//! allocating ([`Dims`]), their division among the parts of a batch, and cache prefetches.
//!
//! One of the two places with `unsafe` code (the other is [`super::team`]). Every tensor goes
//! through [`Views`], which checks what the slices rely on: a contiguous CPU tensor of the
//! slice's element type, with no lazy negation (real tensors have no lazy conjugation), and no
//! written tensor that overlaps any other tensor of the same call.

use std::ops::Range;

use tch::{Device, Kind, Tensor};

use super::math::Element;
use crate::error::{MixError, Result};

/// The slices of one kernel call: what each hands out is recorded, so that a written slice
/// never overlaps another slice of the call.
pub(crate) struct Views {
    /// `(bytes, written)` of every slice handed out so far.
    taken: Vec<(Range<usize>, bool)>,
}

impl Default for Views {
    fn default() -> Self {
        // Room for the tensors of a kernel call (fewer than 8 each), allocated once.
        Self { taken: Vec::with_capacity(8) }
    }
}

impl Views {
    /// The elements of `t`, to read.
    pub(crate) fn read<'t, T: Element>(&mut self, t: &'t Tensor) -> Result<&'t [T]> {
        let (ptr, len) = self.check::<T>(t, false)?;
        if len == 0 {
            return Ok(&[]); // an empty tensor may have no storage at all (a null data pointer)
        }
        // SAFETY: `check` made sure that `t` is a contiguous CPU tensor of `len` elements of
        // type `T` (no lazy negation) and that no slice of this call writes to its bytes; the
        // slice borrows `t`, whose handle keeps the storage alive.
        Ok(unsafe { std::slice::from_raw_parts(ptr as *const T, len) })
    }

    /// The elements of `t`, to write. `t` must be a buffer that this call allocated (fresh or
    /// from a [`super::Scratch`]), or one that its caller handed over as `&mut Tensor` for the
    /// call's outputs (the `_into` calls, whose documentation asks that no other thread use the
    /// buffer meanwhile, as for any in-place libtorch op), so that nothing outside the call
    /// reads or writes it meanwhile.
    pub(crate) fn write<'t, T: Element>(&mut self, t: &'t mut Tensor) -> Result<&'t mut [T]> {
        let (ptr, len) = self.check::<T>(t, true)?;
        if len == 0 {
            return Ok(&mut []);
        }
        // SAFETY: as in `read`; in addition `check` made sure that no other slice of this call
        // overlaps these bytes, and the slice borrows the handle `t` exclusively.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr as *mut T, len) })
    }

    /// The elements of a bool tensor `t` as bytes (libtorch stores `true` as 1), to read: bytes
    /// rather than `bool`, for which a byte other than 0 or 1 would be undefined behaviour.
    pub(crate) fn read_bool<'t>(&mut self, t: &'t Tensor) -> Result<&'t [u8]> {
        let (ptr, len) = self.check_kind(t, Kind::Bool, 1, false)?;
        if len == 0 {
            return Ok(&[]);
        }
        // SAFETY: as in `read`, for a contiguous CPU tensor of `len` one-byte elements; every
        // byte is a valid `u8`.
        Ok(unsafe { std::slice::from_raw_parts(ptr as *const u8, len) })
    }

    /// Checks `t` for a slice of `T` and records its bytes; returns its data pointer and length.
    fn check<T: Element>(&mut self, t: &Tensor, written: bool) -> Result<(usize, usize)> {
        self.check_kind(t, T::KIND, std::mem::size_of::<T>(), written)
    }

    /// [`Views::check`] for elements of `kind`, `size` bytes each.
    fn check_kind(
        &mut self,
        t: &Tensor,
        kind: Kind,
        size: usize,
        written: bool,
    ) -> Result<(usize, usize)> {
        let fits = t.device() == Device::Cpu && t.is_contiguous() && !t.is_neg();
        if t.kind() != kind || !fits {
            return Err(MixError::Kind {
                what: "kernel tensor",
                expected: format!("a contiguous, resolved CPU tensor of {kind:?}"),
                got: t.kind(),
            });
        }
        let len = numel(t);
        if len == 0 {
            return Ok((0, 0));
        }
        let start = t.data_ptr() as usize;
        let bytes = start..start + len * size;
        let overlaps = |other: &Range<usize>| bytes.start < other.end && other.start < bytes.end;
        if self.taken.iter().any(|(other, w)| (written || *w) && overlaps(other)) {
            return Err(MixError::Config(
                "a kernel's output overlaps another of its tensors".to_string(),
            ));
        }
        self.taken.push((bytes, written));
        Ok((start, len))
    }
}

/// The most dimensions [`Dims`] holds without allocating.
const INLINE_DIMS: usize = 8;

/// A defined tensor's sizes, read from libtorch into an array on the stack where it has up to
/// [`INLINE_DIMS`] dimensions (`Tensor::size` allocates a `Vec` for them, which is most of what
/// a small call's checks cost); as a slice through `Deref`.
pub(crate) enum Dims {
    Inline([i64; INLINE_DIMS], usize),
    Heap(Vec<i64>),
}

impl Dims {
    /// The sizes of `t`: for an undefined tensor, what `Tensor::size` reports for it.
    pub(crate) fn of(t: &Tensor) -> Self {
        let c_tensor = t.as_ptr() as *mut torch_sys::C_tensor;
        // SAFETY: `c_tensor` is `t`'s live handle; `at_dim` only reads its number of dimensions.
        let dim = unsafe { torch_sys::at_dim(c_tensor) };
        if dim > INLINE_DIMS {
            return Self::Heap(t.size());
        }
        let mut sizes = [0; INLINE_DIMS];
        // SAFETY: `at_shape` writes one value per dimension, `dim` of them, and `sizes` has
        // room for `INLINE_DIMS >= dim`.
        unsafe { torch_sys::at_shape(c_tensor, sizes.as_mut_ptr()) };
        Self::Inline(sizes, dim)
    }

    /// The number of elements of a tensor of these sizes (libtorch's sizes are never negative;
    /// a product too large for `usize`, which no tensor's storage can hold, saturates).
    pub(crate) fn numel(&self) -> usize {
        let sizes = self.iter().map(|&s| usize::try_from(s).unwrap_or(0));
        match self.contains(&0) {
            true => 0,
            false => sizes.fold(1, usize::saturating_mul),
        }
    }
}

impl std::ops::Deref for Dims {
    type Target = [i64];

    fn deref(&self) -> &[i64] {
        match self {
            Self::Inline(sizes, dim) => &sizes[..*dim],
            Self::Heap(sizes) => sizes,
        }
    }
}

/// The number of elements of a defined tensor, without allocating (see [`Dims`]).
pub(crate) fn numel(t: &Tensor) -> usize {
    Dims::of(t).numel()
}

/// Whether two contiguous tensors share bytes (an empty one shares none).
pub(crate) fn overlap(a: &Tensor, b: &Tensor) -> bool {
    let extent = |t: &Tensor| {
        let start = t.data_ptr() as usize;
        start..start + numel(t) * t.kind().elt_size_in_bytes()
    };
    let (a, b) = (extent(a), extent(b));
    !a.is_empty() && !b.is_empty() && a.start < b.end && b.start < a.end
}

/// Splits `out`, laid out as `planes` planes of `n` rows of `width` elements (`(P, n, width)`),
/// into the parts of consecutive ranges of `per` rows (see [`super::team::ranges`]): part `t`
/// holds, for every plane, the rows of its range. Parts never overlap, so each can go to
/// another thread.
pub(crate) fn split_planes<T>(
    out: &mut [T],
    planes: usize,
    n: usize,
    width: usize,
    per: usize,
) -> Vec<Vec<&mut [T]>> {
    debug_assert_eq!(out.len(), planes * n * width);
    let per = per.max(1);
    let mut split: Vec<Vec<&mut [T]>> =
        (0..n.div_ceil(per)).map(|_| Vec::with_capacity(planes)).collect();
    let mut rest = out;
    for _ in 0..planes {
        let (mut plane, tail) = std::mem::take(&mut rest).split_at_mut(n * width);
        rest = tail;
        for part in split.iter_mut() {
            let at = (per * width).min(plane.len());
            let (rows, tail) = std::mem::take(&mut plane).split_at_mut(at);
            part.push(rows);
            plane = tail;
        }
    }
    split
}

/// Asks the processor to bring `x` into the L2 cache ahead of its use (x86-64; a no-op
/// elsewhere).
#[inline(always)]
pub(crate) fn prefetch<T>(x: Option<&[T]>) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
    #[cfg(target_arch = "x86_64")]
    if let Some(x) = x {
        let line = 64 / std::mem::size_of::<T>();
        for start in (0..x.len()).step_by(line) {
            // SAFETY: a prefetch only hints the cache; the address lies inside `x`.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                    x.as_ptr().add(start) as *const i8,
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;

    #[test]
    fn views_hand_out_the_elements_of_contiguous_tensors() {
        let t = Tensor::arange(6, (Kind::Float, Device::Cpu));
        let mut out = Tensor::zeros([3], (Kind::Double, Device::Cpu));
        let mut views = Views::default();
        assert_eq!(views.read::<f32>(&t).unwrap(), &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        views.write::<f64>(&mut out).unwrap().copy_from_slice(&[7.0, 8.0, 9.0]);
        assert_eq!(Vec::<f64>::try_from(&out).unwrap(), [7.0, 8.0, 9.0]);
        let empty = Tensor::zeros([0, 4], (Kind::Float, Device::Cpu));
        assert!(Views::default().read::<f32>(&empty).unwrap().is_empty());
    }

    #[test]
    fn dims_are_the_sizes_libtorch_reports() {
        let shapes: [&[i64]; 6] =
            [&[], &[0], &[3, 0, 5], &[2, 3, 4], &[1; 8], &[2, 1, 1, 1, 1, 1, 1, 1, 1, 3]];
        for shape in shapes {
            let t = Tensor::zeros(shape, (Kind::Float, Device::Cpu));
            let dims = Dims::of(&t);
            assert_eq!(*dims, t.size()[..], "{shape:?}");
            assert_eq!(dims.numel(), t.numel(), "{shape:?}");
            assert_eq!(numel(&t), t.numel(), "{shape:?}");
            assert_eq!(matches!(dims, Dims::Inline(..)), shape.len() <= INLINE_DIMS);
        }
        let view = Tensor::zeros([4, 6], (Kind::Float, Device::Cpu)).narrow(1, 1, 3).tr();
        assert_eq!(*Dims::of(&view), [3, 4], "a view's own sizes");
    }

    #[test]
    fn views_refuse_what_a_slice_cannot_show() {
        let t = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]);
        let refused = |t: &Tensor| Views::default().read::<f32>(t).is_err();
        assert!(refused(&t.tr()), "a transposed (non-contiguous) view");
        assert!(refused(&t.internal_neg_view()), "a lazily negated view");
        assert!(refused(&t.to_kind(Kind::Double)), "another element type");
        assert!(Views::default().read::<f64>(&t).is_err(), "f32 elements read as f64");
    }

    #[test]
    fn a_written_view_may_not_overlap_another() {
        let t = Tensor::zeros([8], (Kind::Float, Device::Cpu));
        let (mut part, mut alias) = (t.narrow(0, 2, 4), t.narrow(0, 4, 4));
        let mut views = Views::default();
        views.read::<f32>(&t).unwrap();
        assert!(views.write::<f32>(&mut part).is_err(), "written over what is read");
        let mut views = Views::default();
        views.write::<f32>(&mut part).unwrap();
        assert!(views.write::<f32>(&mut alias).is_err(), "two writes over the same bytes");
        let mut views = Views::default();
        views.write::<f32>(&mut part).unwrap();
        assert!(views.read::<f32>(&alias).is_err(), "read from what is written");
        let mut apart = t.narrow(0, 6, 2);
        let mut views = Views::default();
        views.write::<f32>(&mut part).unwrap();
        views.write::<f32>(&mut apart).unwrap();
    }

    #[test]
    fn split_planes_gives_each_part_its_rows_of_every_plane() {
        // 2 planes of 5 rows of width 3, parts of 2 rows: rows 0-1, 2-3 and 4.
        let mut out: Vec<u32> = (0..30).collect();
        let parts = split_planes(&mut out, 2, 5, 3, 2);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], [&[0, 1, 2, 3, 4, 5][..], &[15, 16, 17, 18, 19, 20][..]]);
        assert_eq!(parts[1], [&[6, 7, 8, 9, 10, 11][..], &[21, 22, 23, 24, 25, 26][..]]);
        assert_eq!(parts[2], [&[12, 13, 14][..], &[27, 28, 29][..]]);
        assert!(split_planes::<u32>(&mut [], 3, 0, 4, 1).is_empty());
    }
}
