/**
 * The key tree against a per-sector model: random inserts (CLEAN, dirty and EMPTY placeholders,
 * at sizes from one sector to a whole subtree, generations up to 2^53), walks that drop stale
 * keys, removes, placeholder lookups and sweeps. Every sector must map to the cache position of
 * the newest key written over it, and the index must hold exactly one key per surviving piece.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { KeyIndex, type IndexKey } from '../../src/cache/key-index.js';
import { KEY_FLAG_CLEAN, KEY_FLAG_EMPTY, SUBTREE_SIZE } from '../../src/format/index.js';
import { seededRng, testSeed, type Rng } from '../helpers/rng.js';

const SECTOR = 512;
const SUBTREES = 3;
const SECTORS = (SUBTREES * SUBTREE_SIZE) / SECTOR;
const SEED = testSeed('PCACHE_SEED');
console.log(`key index test seed ${SEED} (replay with PCACHE_SEED=${SEED})`);

/** What one sector holds: the key written over it (by insert number) and where its data is. */
interface Cell {
  id: number;
  flags: number;
  seg: number;
  /** Offset in the segment of this sector's data. */
  at: number;
  gen: number;
  fill: number;
}

class Model {
  readonly cells: Array<Cell | null> = new Array<Cell | null>(SECTORS).fill(null);
  private ids = 0;

  insert(k: IndexKey): void {
    const id = ++this.ids;
    for (let s = k.off / SECTOR; s < (k.off + k.len) / SECTOR; s++) {
      this.cells[s] = { id, flags: k.flags, seg: k.seg, at: k.segOff + (s * SECTOR - k.off), gen: k.gen, fill: k.fill?.id ?? 0 };
    }
  }

  /** The keys the index should hold: one per run of sectors from the same insert. */
  pieces(): number {
    let n = 0;
    for (let s = 0; s < SECTORS; s++) {
      const c = this.cells[s];
      if (c && !(s % (SUBTREE_SIZE / SECTOR) !== 0 && this.cells[s - 1]?.id === c.id)) n++;
    }
    return n;
  }

  clear(off: number, len: number): void {
    for (let s = off / SECTOR; s < (off + len) / SECTOR; s++) this.cells[s] = null;
  }
}

function randomKey(rng: Rng, fills: number[]): IndexKey {
  const t = rng.int(SUBTREES);
  const maxSectors = SUBTREE_SIZE / SECTOR;
  const sectors = rng.int(10) === 0 ? 1 + rng.int(maxSectors) : 1 + rng.int(16);
  const start = rng.int(maxSectors - sectors + 1);
  const off = t * SUBTREE_SIZE + start * SECTOR;
  const len = sectors * SECTOR;
  const kind = rng.int(5);
  if (kind === 0) {
    const id = 1 + rng.int(1000);
    fills.push(id);
    return { off, len, flags: KEY_FLAG_EMPTY, seg: 0, segOff: 0, gen: 0, fill: { id } };
  }
  // Generations near and past 2^32 and up to 2^53: the index packs them in two words.
  const gen = rng.int(3) === 0 ? 2 ** 32 - 2 + rng.int(4) : rng.int(2) === 0 ? Number.MAX_SAFE_INTEGER - rng.int(3) : rng.int(8);
  return { off, len, flags: kind === 1 ? KEY_FLAG_CLEAN : 0, seg: rng.int(4000), segOff: rng.int(16 * 1024 * 1024), gen };
}

/** Walk [off, off+len) and check every hit and gap against the model; stale keys are dropped. */
function walkAndCheck(index: KeyIndex, model: Model, off: number, len: number, isStale: (k: IndexKey) => boolean): void {
  let cur = off;
  const dropped: IndexKey[] = [];
  index.walk(
    off,
    len,
    (k) => {
      const stale = isStale(k);
      if (stale) dropped.push(k);
      return stale;
    },
    (k, from, to) => {
      assert.equal(from, cur, 'hits and gaps cover the range in order');
      assert.ok(k.off <= from && to <= k.off + k.len && from < to, `hit ${from}..${to} lies inside its key ${k.off}:${k.len}`);
      for (let s = from / SECTOR; s < to / SECTOR; s++) {
        const c = model.cells[s];
        assert.ok(c, `sector ${s} is a hit in the index but empty in the model`);
        assert.equal(k.flags, c.flags, `sector ${s}: flags`);
        if (k.flags & KEY_FLAG_EMPTY) {
          assert.equal(k.fill?.id, c.fill, `sector ${s}: fill token`);
        } else {
          assert.equal(k.seg, c.seg, `sector ${s}: segment`);
          assert.equal(k.gen, c.gen, `sector ${s}: generation`);
          assert.equal(k.segOff + (s * SECTOR - k.off), c.at, `sector ${s}: cache position`);
        }
      }
      cur = to;
    },
    (from, to) => {
      assert.equal(from, cur, 'hits and gaps cover the range in order');
      for (let s = from / SECTOR; s < to / SECTOR; s++) {
        const c = model.cells[s];
        // A stale key dropped during this walk reads as a gap.
        assert.ok(!c || dropped.some((d) => d.off <= s * SECTOR && s * SECTOR < d.off + d.len), `sector ${s} is a gap in the index but held in the model`);
      }
      cur = to;
    },
  );
  assert.equal(cur, off + len, 'the walk reaches the end of the range');
  for (const d of dropped) model.clear(d.off, d.len);
}

test(`the key index agrees with a per-sector model (seed ${SEED})`, () => {
  const rng = seededRng(SEED);
  const index = new KeyIndex();
  const model = new Model();
  const fills: number[] = [];
  let staleBelow = 0;
  const isStale = (k: IndexKey): boolean => !(k.flags & KEY_FLAG_EMPTY) && k.gen < staleBelow;
  for (let step = 0; step < 6000; step++) {
    const op = rng.int(20);
    if (op < 12) {
      const k = randomKey(rng, fills);
      index.insert(k);
      model.insert(k);
    } else if (op < 16) {
      const off = rng.int(SECTORS) * SECTOR;
      const len = (1 + rng.int(Math.min(SECTORS - off / SECTOR, 20000))) * SECTOR;
      walkAndCheck(index, model, off, len, rng.int(4) === 0 ? isStale : () => false);
    } else if (op < 18 && fills.length) {
      // What is left of one fill's placeholder, then remove one of its pieces.
      const id = fills[rng.int(fills.length)]!;
      const pieces = index.placeholderPieces({ id }, 0, SECTORS * SECTOR);
      for (const p of pieces) {
        for (let s = p.off / SECTOR; s < (p.off + p.len) / SECTOR; s++) assert.equal(model.cells[s]?.fill, id, `placeholder ${id} at sector ${s}`);
      }
      const held = model.cells.filter((c) => c?.fill === id && c.flags & KEY_FLAG_EMPTY).length;
      assert.equal(pieces.reduce((n, p) => n + p.len / SECTOR, 0), held, `placeholder ${id}: sectors left`);
      if (pieces.length) {
        const p = pieces[rng.int(pieces.length)]!;
        assert.equal(index.remove(p), true, 'a piece found is removed');
        assert.equal(index.remove(p), false, 'and only once');
        model.clear(p.off, p.len);
      }
    } else if (op < 19) {
      staleBelow = rng.int(9);
      const dropped = index.sweep(isStale);
      const before = model.pieces();
      for (let s = 0; s < SECTORS; s++) {
        const c = model.cells[s];
        if (c && !(c.flags & KEY_FLAG_EMPTY) && c.gen < staleBelow) model.cells[s] = null;
      }
      const expected = before - model.pieces();
      assert.equal(dropped, expected, 'sweep drops each stale piece once');
    } else {
      // A key that is not there (wrong generation) is not removed.
      const k = randomKey(rng, []);
      if (!(k.flags & KEY_FLAG_EMPTY)) {
        index.insert(k);
        model.insert(k);
        assert.equal(index.remove({ ...k, gen: k.gen === 0 ? 1 : k.gen - 1 }), false);
        assert.equal(index.remove(k), true);
        model.clear(k.off, k.len);
      }
    }
    assert.equal(index.size, model.pieces(), `step ${step}: the index holds one key per piece`);
  }
  walkAndCheck(index, model, 0, SECTORS * SECTOR, () => false);
  const all = [...index.all()];
  assert.equal(all.length, index.size);
  for (let i = 1; i < all.length; i++) assert.ok(all[i - 1]!.off + all[i - 1]!.len <= all[i]!.off, 'all() is ordered and keys never overlap');
});

test('the key index refuses a key that crosses a subtree, rather than storing it wrongly', () => {
  const index = new KeyIndex();
  assert.throws(() => index.insert({ off: SUBTREE_SIZE - SECTOR, len: 2 * SECTOR, flags: 0, seg: 1, segOff: 0, gen: 1 }), /crosses a subtree/);
  assert.equal(index.size, 0);
});
