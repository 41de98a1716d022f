//! Pictures of block maps: a text grid for terminals and snapshots, and a
//! PNG for documentation.
//!
//! Stage: mask analysis (output for people). Consumes a [`BlockMap`].
//!
//! Large maps are folded: a cell then stands for a rectangle of tiles and
//! shows `#` if all of them are FULL, `.` if all are EMPTY, and `+`
//! otherwise (some PARTIAL, or a mix). The PNG gives mixed cells their own
//! colour; `docs/block-maps.md` has the legend.

use std::fmt::Write;

use super::map::{BlockMap, BlockStats};

/// The class of one cell of a (possibly folded) picture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell {
    Full,
    Partial,
    Empty,
    /// A folded cell whose tiles are not all of one class.
    Mixed,
}

impl Cell {
    pub fn symbol(self) -> char {
        match self {
            Cell::Full => '#',
            Cell::Empty => '.',
            Cell::Partial | Cell::Mixed => '+',
        }
    }

    /// The PNG colour (sRGB).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Cell::Full => [0x25, 0x63, 0xAF],
            Cell::Partial => [0xF5, 0xA6, 0x23],
            Cell::Empty => [0xEC, 0xEC, 0xEC],
            Cell::Mixed => [0x9B, 0x9B, 0x9B],
        }
    }
}

/// A map folded to at most `max_rows x max_cols` cells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Folded {
    /// Query tiles per row.
    pub fq: usize,
    /// Key tiles per column.
    pub fk: usize,
    pub cells: Vec<Vec<Cell>>,
}

/// Folds a map so it fits `max_rows x max_cols` cells (each at least 1).
/// Costs O(runs + cells) per query tile, never O(tiles).
pub fn fold(map: &BlockMap, max_rows: usize, max_cols: usize) -> Folded {
    let (qn, kn) = (map.q_tiles(), map.kv_tiles());
    let fq = qn.div_ceil(max_rows.max(1)).max(1);
    let fk = kn.div_ceil(max_cols.max(1)).max(1);
    let (rows, cols) = (qn.div_ceil(fq), kn.div_ceil(fk));
    let mut cells = Vec::with_capacity(rows);
    let mut full = vec![0u64; cols];
    let mut partial = vec![0u64; cols];
    for r in 0..rows {
        full.iter_mut().for_each(|x| *x = 0);
        partial.iter_mut().for_each(|x| *x = 0);
        let qts = r * fq..((r + 1) * fq).min(qn);
        let n_rows = qts.len() as u64;
        for qt in qts {
            for range in map.full_ranges(qt) {
                let (s, e) = (range.start as usize, range.end as usize);
                for (g, slot) in full
                    .iter_mut()
                    .enumerate()
                    .take((e - 1) / fk + 1)
                    .skip(s / fk)
                {
                    *slot += (e.min((g + 1) * fk) - s.max(g * fk)) as u64;
                }
            }
            for &k in map.partial(qt) {
                partial[k as usize / fk] += 1;
            }
        }
        cells.push(
            (0..cols)
                .map(|c| {
                    let total = n_rows * (((c + 1) * fk).min(kn) - c * fk) as u64;
                    match (full[c], partial[c]) {
                        (f, _) if f == total => Cell::Full,
                        (0, 0) => Cell::Empty,
                        (0, p) if p == total => Cell::Partial,
                        _ => Cell::Mixed,
                    }
                })
                .collect(),
        );
    }
    Folded { fq, fk, cells }
}

/// The grid size the CLI uses: at most 64 rows of 128 cells.
pub const GRID_ROWS: usize = 64;
pub const GRID_COLS: usize = 128;

/// The map as a text grid with axis labels (query tiles down, key tiles
/// across), folded to at most `max_rows x max_cols` cells, and a legend.
pub fn grid(map: &BlockMap, max_rows: usize, max_cols: usize) -> String {
    let mut s = String::new();
    if map.q_tiles() == 0 || map.kv_tiles() == 0 {
        let _ = writeln!(
            s,
            "(no tiles: Q = {} gives {} query tiles, KV = {} gives {} key tiles)",
            map.q_len(),
            map.q_tiles(),
            map.kv_len(),
            map.kv_tiles()
        );
        return s;
    }
    let f = fold(map, max_rows, max_cols);
    let corner = "q\\kv";
    let last_label = (f.cells.len() - 1) * f.fq;
    let w = corner.len().max(last_label.to_string().len());
    // Column labels every 10 cells.
    let cols = f.cells[0].len();
    let mut header = format!("{corner:>w$} ");
    let mut c = 0;
    while c < cols {
        let label = (c * f.fk).to_string();
        header.push_str(&label);
        let next = (c + 10).min(cols);
        let pad = (next - c).saturating_sub(label.len());
        if c + 10 < cols {
            header.push_str(&" ".repeat(pad.max(1)));
        }
        c += 10;
    }
    let _ = writeln!(s, "{}", header.trim_end());
    for (r, row) in f.cells.iter().enumerate() {
        let line: String = row.iter().map(|c| c.symbol()).collect();
        let _ = writeln!(s, "{:>w$} {line}", r * f.fq);
    }
    let _ = writeln!(s, "legend: # full, + partial, . empty");
    if f.fq > 1 || f.fk > 1 {
        let _ = writeln!(
            s,
            "folded: a row is {} query tile{}, a column {} key tile{}; a cell is # if all its tiles are full, . if all are empty, + otherwise",
            f.fq,
            if f.fq == 1 { "" } else { "s" },
            f.fk,
            if f.fk == 1 { "" } else { "s" }
        );
    }
    s
}

fn pct(n: u64, d: u64) -> String {
    if d == 0 {
        "0%".to_string()
    } else {
        format!("{:.1}%", 100.0 * n as f64 / d as f64)
    }
}

/// One line of what the map is of.
pub fn title(name: &str, map: &BlockMap) -> String {
    format!(
        "attention {name}: Q = {}, KV = {}, q_offset = {}, tiles {} -> {} x {} tiles",
        map.q_len(),
        map.kv_len(),
        map.q_offset(),
        map.tiling(),
        map.q_tiles(),
        map.kv_tiles()
    )
}

/// The statistics as text.
pub fn stats_text(s: &BlockStats) -> String {
    let t = s.tiles();
    format!(
        "tiles: {t}: full {} ({}), partial {} ({}), empty {} ({})\ndensity: {:.1}% of tiles computed; work: {:.1}% of the dense Q x KV elements\n",
        s.full,
        pct(s.full, t),
        s.partial,
        pct(s.partial, t),
        s.empty,
        pct(s.empty, t),
        100.0 * s.density,
        100.0 * s.work_fraction
    )
}

/// Largest number of cells on a side of a PNG before folding.
pub const PNG_MAX_CELLS: usize = 1024;

/// The map as an RGB PNG: one square block of pixels per tile (per folded
/// cell on maps with more than [`PNG_MAX_CELLS`] tiles on a side), blocks of
/// at most 24 pixels sized so the picture is about 768 pixels across, with
/// 1-pixel white gaps between blocks of 6 pixels or more.
pub fn png(map: &BlockMap) -> Result<Vec<u8>, png::EncodingError> {
    let f = fold(map, PNG_MAX_CELLS, PNG_MAX_CELLS);
    let rows = f.cells.len();
    let cols = f.cells.first().map_or(0, Vec::len);
    let side = rows.max(cols).max(1);
    let px = (768 / side).clamp(1, 24);
    let gap = usize::from(px >= 6);
    let (w, h) = ((cols * px).max(1), (rows * px).max(1));
    let mut data = vec![0xFFu8; w * h * 3];
    if rows == 0 || cols == 0 {
        // No tile on one side (Q or KV is 0): the picture is all empty.
        for pixel in data.chunks_exact_mut(3) {
            pixel.copy_from_slice(&Cell::Empty.rgb());
        }
    }
    for (r, row) in f.cells.iter().enumerate() {
        for (c, cell) in row.iter().enumerate() {
            let rgb = cell.rgb();
            for y in r * px..(r + 1) * px - gap {
                for x in c * px..(c + 1) * px - gap {
                    let o = (y * w + x) * 3;
                    data[o..o + 3].copy_from_slice(&rgb);
                }
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&data)?;
        writer.finish()?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::{TileClass, Tiling};

    fn causal_like(n: usize) -> BlockMap {
        let classes: Vec<Vec<TileClass>> = (0..n)
            .map(|q| {
                (0..n)
                    .map(|k| match k.cmp(&q) {
                        std::cmp::Ordering::Less => TileClass::Full,
                        std::cmp::Ordering::Equal => TileClass::Partial,
                        std::cmp::Ordering::Greater => TileClass::Empty,
                    })
                    .collect()
            })
            .collect();
        BlockMap::from_classes(Tiling::new(2, 2).unwrap(), 2 * n, 2 * n, 0, &classes)
    }

    #[test]
    fn small_grid_is_one_char_per_tile() {
        let g = grid(&causal_like(3), 64, 128);
        assert_eq!(
            g,
            "q\\kv 0\n   0 +..\n   1 #+.\n   2 ##+\nlegend: # full, + partial, . empty\n"
        );
    }

    #[test]
    fn folding_merges_cells() {
        let m = causal_like(8);
        let f = fold(&m, 4, 4);
        assert_eq!((f.fq, f.fk), (2, 2));
        let text: Vec<String> = f
            .cells
            .iter()
            .map(|r| r.iter().map(|c| c.symbol()).collect())
            .collect();
        assert_eq!(text, vec!["+...", "#+..", "##+.", "###+"]);
        assert_eq!(f.cells[0][0], Cell::Mixed);
        // Folding 8 tiles into 3 columns: 3 + 3 + 2.
        let f = fold(&m, 8, 3);
        assert_eq!(f.fk, 3);
        assert_eq!(f.cells[7], vec![Cell::Full, Cell::Full, Cell::Mixed]);
        assert_eq!(f.cells[0], vec![Cell::Mixed, Cell::Empty, Cell::Empty]);
    }

    #[test]
    fn png_has_the_expected_size() {
        let bytes = png(&causal_like(4)).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder.read_info().unwrap();
        let info = reader.info();
        assert_eq!((info.width, info.height), (4 * 24, 4 * 24));
    }

    #[test]
    fn png_of_a_map_without_key_tiles_is_empty_colored() {
        // Q = 2 (one query tile), KV = 0: a column of nothing.
        let classes: Vec<Vec<TileClass>> = vec![Vec::new()];
        let map = BlockMap::from_classes(Tiling::new(2, 2).unwrap(), 2, 0, 0, &classes);
        let bytes = png(&map).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (1, 24));
        assert!(buf[..info.buffer_size()]
            .chunks_exact(3)
            .all(|p| p == Cell::Empty.rgb()));
    }
}
