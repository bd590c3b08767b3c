//! The per-card ring buffer: a card's last N scaled feature vectors, the current one last.

/// A fixed-capacity ring of scaled rows with their transaction ids and event times.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    capacity: usize,
    width: usize,
    /// `capacity * width` floats; row `slot` lives at `slot * width`.
    rows: Vec<f32>,
    /// Transaction ids per slot, for deduplication and for explaining alerts.
    ids: Vec<Option<std::sync::Arc<str>>>,
    /// Event times per slot.
    ts: Vec<f64>,
    /// Slot that the next push writes.
    head: usize,
    /// Real rows held (at most `capacity`).
    len: usize,
}

impl Window {
    /// An empty window of `capacity` rows of `width` features.
    pub fn new(capacity: usize, width: usize) -> Self {
        assert!(
            capacity > 0 && width > 0,
            "window needs a length and features"
        );
        Window {
            capacity,
            width,
            rows: vec![0.0; capacity * width],
            ids: vec![None; capacity],
            ts: vec![0.0; capacity],
            head: 0,
            len: 0,
        }
    }

    /// Real rows held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no row was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maximum rows (the model's window length).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether a transaction with this id is already in the window (a redelivery).
    pub fn contains_id(&self, id: &str) -> bool {
        self.slots().any(|s| self.ids[s].as_deref() == Some(id))
    }

    /// Appends a row, dropping the oldest when full.
    pub fn push(&mut self, row: &[f32], id: Option<&str>, ts: f64) {
        debug_assert_eq!(row.len(), self.width);
        let at = self.head * self.width;
        self.rows[at..at + self.width].copy_from_slice(row);
        self.ids[self.head] = id.map(Into::into);
        self.ts[self.head] = ts;
        self.head = (self.head + 1) % self.capacity;
        self.len = (self.len + 1).min(self.capacity);
    }

    /// Slots of the real rows, oldest first.
    fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        let start = (self.head + self.capacity - self.len) % self.capacity;
        (0..self.len).map(move |i| (start + i) % self.capacity)
    }

    /// Writes the model input, `capacity * width` floats: zero rows first (left padding), then the
    /// real rows oldest to newest, so the current transaction is always the last row.
    /// Returns the number of real rows; positions before `capacity - len` are padding.
    pub fn write_padded(&self, out: &mut [f32]) -> usize {
        assert_eq!(out.len(), self.capacity * self.width);
        let pad = (self.capacity - self.len) * self.width;
        out[..pad].fill(0.0);
        for (i, s) in self.slots().enumerate() {
            let dst = pad + i * self.width;
            out[dst..dst + self.width].copy_from_slice(&self.rows[s * self.width..][..self.width]);
        }
        self.len
    }

    /// Row width (features per transaction).
    pub fn width(&self) -> usize {
        self.width
    }

    /// The real rows, oldest first: `len * width` floats, with their ids and event times (what a
    /// changelog record keeps).
    pub fn rows(&self) -> (Vec<f32>, Vec<Option<std::sync::Arc<str>>>, Vec<f64>) {
        let mut rows = Vec::with_capacity(self.len * self.width);
        let (mut ids, mut ts) = (Vec::with_capacity(self.len), Vec::with_capacity(self.len));
        for s in self.slots() {
            rows.extend_from_slice(&self.rows[s * self.width..][..self.width]);
            ids.push(self.ids[s].clone());
            ts.push(self.ts[s]);
        }
        (rows, ids, ts)
    }

    /// A window of `capacity` rows of `width` holding these rows (oldest first, as
    /// [`Window::rows`] gives them); None when they do not fit (another model's window).
    pub fn from_rows(
        capacity: usize,
        width: usize,
        rows: &[f32],
        ids: Vec<Option<std::sync::Arc<str>>>,
        ts: &[f64],
    ) -> Option<Self> {
        let len = ids.len();
        if capacity == 0 || width == 0 || len > capacity || ts.len() != len {
            return None;
        }
        if rows.len() != len * width {
            return None;
        }
        let mut w = Window::new(capacity, width);
        for (i, id) in ids.into_iter().enumerate() {
            w.rows[i * width..][..width].copy_from_slice(&rows[i * width..][..width]);
            w.ids[i] = id;
            w.ts[i] = ts[i];
        }
        w.len = len;
        w.head = len % capacity;
        Some(w)
    }

    /// Transaction ids aligned with `write_padded`'s rows (None for padding or id-less records).
    /// Shared, not copied: a scored window hands them on for every transaction.
    pub fn padded_ids(&self) -> Vec<Option<std::sync::Arc<str>>> {
        let mut ids = vec![None; self.capacity - self.len];
        ids.extend(self.slots().map(|s| self.ids[s].clone()));
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_rebuilt_from_its_rows_is_the_same_window() {
        for pushed in [0usize, 1, 3, 4, 9] {
            let mut w = Window::new(4, 2);
            for i in 0..pushed {
                let id = format!("t{i}");
                w.push(&[i as f32, -(i as f32)], Some(&id), i as f64);
            }
            let (rows, ids, ts) = w.rows();
            let back = Window::from_rows(4, 2, &rows, ids, &ts).unwrap();
            let (mut a, mut b) = (vec![0f32; 8], vec![0f32; 8]);
            assert_eq!(w.write_padded(&mut a), back.write_padded(&mut b));
            assert_eq!(a, b, "{pushed} pushed");
            assert_eq!(w.padded_ids(), back.padded_ids());
            // And it goes on the same way.
            let (mut w, mut back) = (w, back);
            w.push(&[7.0, 7.0], Some("n"), 99.0);
            back.push(&[7.0, 7.0], Some("n"), 99.0);
            assert_eq!(w.rows(), back.rows());
        }
        // Rows of another shape do not fit.
        assert!(Window::from_rows(4, 3, &[0.0; 4], vec![None, None], &[0.0, 0.0]).is_none());
        assert!(Window::from_rows(1, 2, &[0.0; 4], vec![None, None], &[0.0, 0.0]).is_none());
    }

    fn ids(w: &Window) -> Vec<Option<String>> {
        w.padded_ids()
            .into_iter()
            .map(|id| id.map(|s| s.to_string()))
            .collect()
    }

    fn some(ids: &[Option<&str>]) -> Vec<Option<String>> {
        ids.iter().map(|i| i.map(str::to_string)).collect()
    }

    #[test]
    fn pads_left_and_keeps_the_last_n_in_order() {
        let mut w = Window::new(3, 2);
        w.push(&[1.0, 1.5], Some("a"), 1.0);
        let mut out = [9f32; 6];
        assert_eq!(w.write_padded(&mut out), 1);
        assert_eq!(out, [0.0, 0.0, 0.0, 0.0, 1.0, 1.5]);
        assert_eq!(ids(&w), some(&[None, None, Some("a")]));
        for (i, id) in ["b", "c", "d"].iter().enumerate() {
            let v = (i + 2) as f32;
            w.push(&[v, v], Some(id), v as f64);
        }
        assert_eq!(w.write_padded(&mut out), 3);
        assert_eq!(out, [2.0, 2.0, 3.0, 3.0, 4.0, 4.0]);
        assert_eq!(ids(&w), some(&[Some("b"), Some("c"), Some("d")]));
        assert!(
            w.contains_id("d") && !w.contains_id("a"),
            "evicted ids are forgotten"
        );
    }
}
