/**
 * The log moving to a new segment (spec sections 3 and 6): a LAST kset ends the log in its
 * segment; write-back follows it (dirty_tail moves to the new segment at once), GC follows it
 * (key_tail moves on and the old log segment is freed, unless dirty_tail is still in it), and
 * replay follows it. The tails start near the end of segment 0 so that a few ksets get there.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Cache } from '../../src/cache/cache.js';
import { gcThreshold } from '../../src/cache/gc.js';
import { formatPosition, samePosition } from '../../src/format/index.js';
import { seededRng, testSeed } from '../helpers/rng.js';
import { CACHE_SIZE, FAST, formatWithLogNearEnd, keepProcessAlive, MiB, pattern, SparseStore, StoreBacking, StoreMedium, waitFor } from './helpers.js';

keepProcessAlive();

const BACKING_SIZE = 64 * MiB;
const SECTOR = 512;
const SEED = testSeed('PCACHE_SEED');
console.log(`log wrap test seed ${SEED} (replay with PCACHE_SEED=${SEED})`);

for (const [i, v] of [
  { dataCrc: false, gcPercent: 0 },
  { dataCrc: true, gcPercent: 90 },
].entries()) {
  test(`the log moves to a new segment: write-back, GC and replay follow the LAST kset (data_crc ${v.dataCrc}, gc_percent ${v.gcPercent}, seed ${SEED})`, async () => {
    const rng = seededRng(SEED + i);
    const medium = new StoreMedium(CACHE_SIZE);
    const backing = new StoreBacking(BACKING_SIZE);
    const model = new SparseStore(BACKING_SIZE);
    const start = await formatWithLogNearEnd(medium, v);
    let cache = await Cache.open(medium, backing, FAST);
    assert.ok(samePosition(cache.keyHead, start) && samePosition(cache.dirtyTail, start) && samePosition(cache.keyTail, start));

    let switched = false;
    // Counters start again at each open: segments freed by earlier instances are added up here.
    let freedBefore = 0;
    for (let step = 0; step < 500; step++) {
      const len = Math.floor(Math.exp(rng.next() * Math.log(128))) * SECTOR;
      const off = rng.int((BACKING_SIZE - len) / SECTOR) * SECTOR;
      const r = rng.next();
      if (r < 0.6) {
        const data = pattern(rng, len);
        model.write(data, off);
        await cache.write(off, data, { fua: rng.next() < 0.1 });
      } else if (r < 0.75) {
        assert.ok((await cache.read(off, len)).equals(model.read(Buffer.allocUnsafe(len), off)), `step ${step}: read at ${off}+${len}`);
      } else if (r < 0.85) {
        await cache.flush();
      } else if (r < 0.88) {
        await cache.close();
        freedBefore += cache.status().counters.segmentsFreed;
        cache = await Cache.open(medium, backing, FAST);
      }
      if (!switched && cache.keyHead.seg !== start.seg) {
        switched = true;
        // Replay right after the switch: the LAST kset leads it into the new segment.
        await cache.close(); // writes the open kset: key_head is final after it
        freedBefore += cache.status().counters.segmentsFreed;
        const head = cache.keyHead;
        cache = await Cache.open(medium, backing, FAST);
        assert.ok(samePosition(cache.keyHead, head), `replay follows the LAST kset to ${formatPosition(head)}, got ${formatPosition(cache.keyHead)}`);
      }
    }
    assert.ok(switched, `the log left segment 0 (key_head ${formatPosition(cache.keyHead)})`);
    await cache.drain({ maxErrors: 0 });
    assert.notEqual(cache.dirtyTail.seg, start.seg, 'write-back followed the LAST kset');
    assert.ok(samePosition(cache.dirtyTail, cache.keyHead));
    if (v.gcPercent === 0) {
      await waitFor(() => samePosition(cache.keyTail, cache.dirtyTail), 'GC to reach dirty_tail');
      assert.notEqual(cache.keyTail.seg, start.seg, 'GC followed the LAST kset');
      // Freeing follows key_tail's update; it may have happened before the last reopen.
      await waitFor(() => freedBefore + cache.status().counters.segmentsFreed > 0, 'and freed segments, the old log segment among them');
    } else {
      // Each reopen starts the data head in a fresh segment (as dm-pcache does), so some seeds do
      // fill 90% of this small cache. GC may have run only if the used segments reached 90% when
      // it started: used now plus those freed since (by any instance) is at least what was used then.
      const st = cache.status();
      if (!samePosition(cache.keyTail, start)) {
        assert.ok(
          st.segsUsed + freedBefore + st.counters.segmentsFreed >= gcThreshold(st.nSegs, 90),
          `gc_percent 90: GC collected (key_tail ${formatPosition(cache.keyTail)}) though at most ${st.segsUsed + freedBefore + st.counters.segmentsFreed} of ${st.nSegs} segments were used`,
        );
      }
    }
    await cache.close();
    assert.equal(backing.store.firstDiff(model), -1, 'the backing device equals the model');

    const again = await Cache.open(medium, backing, FAST);
    for (let off = 0; off < BACKING_SIZE; off += 4 * MiB) {
      assert.ok((await again.read(off, 4 * MiB)).equals(model.read(Buffer.allocUnsafe(4 * MiB), off)), `read after reopen at ${off}`);
    }
    assert.ok(again.keyHead.seg !== start.seg);
    await again.close();
  });
}
