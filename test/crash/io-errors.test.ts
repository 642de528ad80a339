/**
 * Cache-device I/O errors (issue 6, item 6): a medium that fails chosen reads, writes or syncs.
 * The affected request returns EIO (a CacheError), no other data is damaged, and the cache keeps
 * working afterwards: once the faults stop, a flush succeeds, everything reads back, survives a
 * power cut, and drains to the backing device.
 *
 * PCACHE_SEED replays the randomized test.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Cache } from '../../src/cache/cache.js';
import { checkCache } from '../../src/cache/check.js';
import { CACHE_CTRL_OFF, SEG_DATA_OFF, SEG_GEN_OFF, SEG_SIZE, SEGMENTS_OFF } from '../../src/format/index.js';
import { seededRng as mediaRng } from '../../src/media/crash.js';
import { SparseCrashMedium } from '../../src/media/sparse-crash.js';
import { PageImage, PageMedium } from '../../src/media/sparse.js';
import { seededRng, testSeed, type Rng } from '../helpers/rng.js';
import { SparseCrashBacking } from './devices.js';
import { assertIoError, PossibleValues, sectorRuns } from './faults.js';
import { SECTOR, tagData, tagSector } from './tags.js';

const MiB = 1024 * 1024;
const CACHE_SIZE = 512 * MiB;
const BACKING_SIZE = 16 * MiB;
const SEED = testSeed('PCACHE_SEED');
console.log(`cache I/O error test seed ${SEED} (replay with PCACHE_SEED=${SEED})`);

function taggedBacking(): PageImage {
  return new PageImage(BACKING_SIZE, (index, page) => {
    for (let at = 0; at < page.length; at += SECTOR) tagSector(page, at, index * page.length + at, 0);
  });
}

const inData = (off: number): boolean => off >= SEGMENTS_OFF && (off - SEGMENTS_OFF) % SEG_SIZE >= SEG_DATA_OFF;
const inCtrl = (off: number): boolean => off >= CACHE_CTRL_OFF && off < CACHE_CTRL_OFF + 64;
const inGen = (off: number): boolean => off >= SEGMENTS_OFF && (off - SEGMENTS_OFF) % SEG_SIZE >= SEG_GEN_OFF && (off - SEGMENTS_OFF) % SEG_SIZE < SEG_GEN_OFF + 32;

async function until(cond: () => boolean, what: string, ms = 20_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** Read every written sector back through `cache`, checking and pinning it. */
async function readAll(cache: Cache, pv: PossibleValues, what: string): Promise<void> {
  for (const r of sectorRuns(pv.written())) pv.readBack(r.off, await cache.read(r.off, r.len), what);
}

/** Power cut that keeps nothing unsynced, reopen, and compare; then drain and compare the backing device. */
async function crashAndVerify(medium: SparseCrashMedium, backing: SparseCrashBacking, cache: Cache, pv: PossibleValues): Promise<void> {
  const mImg = medium.crash(mediaRng(1), { keep: 0 });
  const bImg = backing.crash(mediaRng(2), { keep: 0 });
  medium.kill();
  backing.kill();
  await cache.abandon();
  const report = await checkCache(new PageMedium(mImg.clone()), { backingSize: BACKING_SIZE });
  assert.deepEqual(report.problems, [], 'check after the power cut');
  const b2 = new SparseCrashBacking(bImg);
  const c2 = await Cache.open(new SparseCrashMedium(mImg), b2, { writebackIntervalMs: 5 });
  await readAll(c2, pv, 'after the power cut');
  assert.deepEqual(pv.uncertain(), []);
  await c2.drain({ maxErrors: 0 });
  for (const r of sectorRuns(pv.written())) {
    const buf = Buffer.alloc(r.len);
    b2.peek(buf, r.off);
    pv.readBack(r.off, buf, 'the backing device after drain');
  }
  await c2.close();
}

function randomRange(rng: Rng): { off: number; len: number } {
  const len = (1 + rng.int(rng.next() < 0.1 ? 512 : 32)) * SECTOR;
  return { off: Math.min(BACKING_SIZE - len, rng.int(BACKING_SIZE / SECTOR) * SECTOR), len };
}

test(`random cache-device read, write and sync errors: each affects only its request (seed ${SEED})`, async (t) => {
  for (const dataCrc of [false, true]) {
    const rng = seededRng(SEED + (dataCrc ? 1 : 0));
    const medium = new SparseCrashMedium(CACHE_SIZE);
    const backing = new SparseCrashBacking(taggedBacking());
    const cache = await Cache.open(medium, backing, { dataCrc, gcPercent: 5, writebackIntervalMs: 5, ksetCloseMs: 5 });
    const pv = new PossibleValues();
    const n = { writes: 0, failedWrites: 0, reads: 0, failedReads: 0, flushes: 0, failedFlushes: 0, modes: new Set<string>() };
    const faultRng = seededRng(SEED ^ 0xfa17);
    const p = (): boolean => faultRng.next() < 0.3;
    const modes: Array<[string, () => void]> = [
      ['none', () => undefined],
      ['writes', () => medium.failWrites(() => p())],
      ['data writes', () => medium.failWrites((off) => inData(off) && p())],
      ['reads', () => medium.failReads(() => p())],
      ['syncs', () => medium.failSyncs(true)],
      ['tail and generation writes', () => medium.failWrites((off) => inCtrl(off) || inGen(off))],
      ['everything', () => (medium.failWrites(() => p()), medium.failReads(() => p()), medium.failSyncs(faultRng.next() < 0.5))],
    ];
    for (let round = 0; round < 160; round++) {
      if (round % 8 === 0) {
        medium.failWrites(null);
        medium.failReads(null);
        medium.failSyncs(false);
        const [name, arm] = modes[rng.int(modes.length)]!;
        n.modes.add(name);
        arm();
      }
      const batch: Array<Promise<void>> = [];
      const busy: Array<{ off: number; len: number }> = [];
      for (let i = 0, want = 1 + rng.int(5); i < want; i++) {
        const r = rng.next();
        if (r < 0.1) {
          n.flushes++;
          batch.push(cache.flush().catch((err) => (assertIoError(err, 'flush'), n.failedFlushes++, undefined)));
          continue;
        }
        const range = randomRange(rng);
        if (busy.some((b) => range.off < b.off + b.len && b.off < range.off + range.len)) continue;
        busy.push(range);
        if (r < 0.55) {
          const id = pv.nextId++;
          const zero = r < 0.15;
          n.writes++;
          const w = zero ? cache.writeZeroes(range.off, range.len) : cache.write(range.off, tagData(range.off, range.len, id), { fua: r > 0.5 });
          batch.push(
            w.then(
              () => pv.wrote(range.off, range.len, id, true, zero),
              (err) => {
                assertIoError(err, 'write');
                n.failedWrites++;
                pv.wrote(range.off, range.len, id, false, zero);
              },
            ),
          );
        } else {
          n.reads++;
          batch.push(
            cache.read(range.off, range.len).then(
              (buf) => pv.readBack(range.off, buf, `read ${range.off}+${range.len} in round ${round}`),
              (err) => (assertIoError(err, 'read'), n.failedReads++, undefined),
            ),
          );
        }
      }
      await Promise.all(batch);
    }
    medium.failWrites(null);
    medium.failReads(null);
    medium.failSyncs(false);
    t.diagnostic(
      `data_crc ${dataCrc}: ${n.writes} writes (${n.failedWrites} failed), ${n.reads} reads (${n.failedReads} failed), ` +
        `${n.flushes} flushes (${n.failedFlushes} failed); write-back errors ${cache.status().counters.writebackErrors}; modes ${[...n.modes].join(', ')}`,
    );
    assert.ok(n.failedWrites > 0 && n.failedReads > 0 && n.failedFlushes > 0, 'faults reached writes, reads and flushes');
    // Healed: the cache works again, a flush makes everything durable, and all of it survives.
    const id = pv.nextId++;
    await cache.write(0, tagData(0, 4096, id));
    pv.wrote(0, 4096, id, true);
    await cache.flush();
    await readAll(cache, pv, 'after the faults stopped');
    await crashAndVerify(medium, backing, cache, pv);
  }
});

test('a failing data write returns EIO and changes nothing else; the next write works', async () => {
  const medium = new SparseCrashMedium(CACHE_SIZE);
  const backing = new SparseCrashBacking(taggedBacking());
  const cache = await Cache.open(medium, backing, { writebackIntervalMs: 60_000, ksetCloseMs: 60_000 });
  const pv = new PossibleValues();
  await cache.write(0, tagData(0, 8192, 1));
  pv.wrote(0, 8192, 1, true);
  medium.failWrites((off, len) => inData(off) && len === 4096);
  await assert.rejects(cache.write(MiB, tagData(MiB, 4096, 2)), (err) => (assertIoError(err, 'write'), true));
  await cache.write(2 * MiB, tagData(2 * MiB, 8192, 3));
  pv.wrote(2 * MiB, 8192, 3, true);
  pv.readBack(0, await cache.read(0, 8192), 'the data before');
  pv.readBack(MiB, await cache.read(MiB, 4096), 'the failed range');
  assert.equal(pv.exact(MiB / SECTOR), 0, 'the failed write left the old content');
  pv.readBack(2 * MiB, await cache.read(2 * MiB, 8192), 'a write after');
  medium.failWrites(null);
  await cache.write(MiB, tagData(MiB, 4096, 4));
  pv.wrote(MiB, 4096, 4, true);
  await cache.flush();
  await crashAndVerify(medium, backing, cache, pv);
});

test('a failing read of cached data returns EIO; other reads, and the same read later, work', async () => {
  const medium = new SparseCrashMedium(CACHE_SIZE);
  const backing = new SparseCrashBacking(taggedBacking());
  const cache = await Cache.open(medium, backing, { writebackIntervalMs: 60_000, ksetCloseMs: 60_000 });
  const pv = new PossibleValues();
  await cache.write(0, tagData(0, 4096, 1));
  await cache.write(MiB, tagData(MiB, 4096, 2));
  pv.wrote(0, 4096, 1, true);
  pv.wrote(MiB, 4096, 2, true);
  // Fail reads of the first write's data only: its place in the cache is the first 4 KiB written.
  let target = -1;
  medium.failReads((off, len) => {
    if (target < 0 && inData(off) && len === 4096) target = off;
    return off === target;
  });
  await assert.rejects(cache.read(0, 4096), (err) => (assertIoError(err, 'read'), true));
  pv.readBack(MiB, await cache.read(MiB, 4096), 'another cached range');
  pv.readBack(4 * MiB, await cache.read(4 * MiB, 4096), 'a miss');
  medium.failReads(null);
  pv.readBack(0, await cache.read(0, 4096), 'the same range, healed');
  await cache.flush();
  await crashAndVerify(medium, backing, cache, pv);
});

test('a failing sync fails the flush and FUA writes; once healed, a flush makes all of it durable', async () => {
  const medium = new SparseCrashMedium(CACHE_SIZE);
  const backing = new SparseCrashBacking(taggedBacking());
  const cache = await Cache.open(medium, backing, { writebackIntervalMs: 60_000, ksetCloseMs: 60_000 });
  const pv = new PossibleValues();
  await cache.write(0, tagData(0, 4096, 1));
  pv.wrote(0, 4096, 1, true);
  medium.failSyncs(true);
  await assert.rejects(cache.flush(), (err) => (assertIoError(err, 'flush'), true));
  await assert.rejects(cache.write(MiB, tagData(MiB, 4096, 2), { fua: true }), (err) => (assertIoError(err, 'FUA write'), true));
  pv.wrote(MiB, 4096, 2, false);
  // Reads still see both.
  pv.readBack(0, await cache.read(0, 4096), 'while syncs fail');
  pv.readBack(MiB, await cache.read(MiB, 4096), 'while syncs fail');
  assert.equal(pv.exact(MiB / SECTOR), 2, 'the FUA write is readable though it failed');
  medium.failSyncs(false);
  await cache.flush();
  await crashAndVerify(medium, backing, cache, pv);
});

test('failing tail and generation updates hold write-back and GC back, never the requests; healed, they catch up', async () => {
  const medium = new SparseCrashMedium(CACHE_SIZE);
  const backing = new SparseCrashBacking(taggedBacking());
  const cache = await Cache.open(medium, backing, { gcPercent: 0, writebackIntervalMs: 5, ksetCloseMs: 2 });
  const pv = new PossibleValues();
  medium.failWrites((off) => inCtrl(off) || inGen(off));
  const rng = seededRng(SEED);
  for (let i = 0; i < 60; i++) {
    const r = randomRange(rng);
    const id = pv.nextId++;
    await cache.write(r.off, tagData(r.off, r.len, id));
    pv.wrote(r.off, r.len, id, true);
    if (i % 10 === 0) await cache.flush();
  }
  await until(() => cache.status().counters.writebackErrors > 0, 'write-back to meet the failing dirty_tail update');
  assert.match(cache.status().writebackError ?? '', /EIO/);
  await readAll(cache, pv, 'while tail updates fail');
  medium.failWrites(null);
  await cache.drain({ maxErrors: 100 });
  assert.equal(cache.status().dirtyBytes, 0);
  await cache.flush();
  await crashAndVerify(medium, backing, cache, pv);
});
