/**
 * After an unclean stop, replay keeps every write that a FLUSH (or FUA) made durable: random
 * writes, FUA writes and flushes run while write-back and GC work, then the cache and the backing
 * device both lose power at a random moment (every unsynced sector kept or lost at random, as
 * src/media/volatile.ts does). A cache reopened on those images must read, for every sector, the
 * flushed value or one written after it, never anything older or anything else. Then
 * `pcache writeback`, run on the images as files, leaves the backing device equal to what the
 * reopened cache read.
 */
import assert from 'node:assert/strict';
import { open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { openFileBacking } from '../../src/backing/file.js';
import { Cache } from '../../src/cache/cache.js';
import { samePosition } from '../../src/format/index.js';
import { openFileMedium } from '../../src/media/file.js';
import { runPcache } from '../helpers/cli.js';
import { seededRng, testSeed, type Rng } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { CACHE_SIZE, CrashStoreBacking, CrashStoreMedium, FAST, formatWithLogNearEnd, keepProcessAlive, MiB, pattern, quickPattern, SparseStore, StoreBacking, StoreMedium } from './helpers.js';

keepProcessAlive();

const BACKING_SIZE = 64 * MiB;
const SECTOR = 512;
const SEED = testSeed('PCACHE_SEED');
console.log(`crash test seed ${SEED} (replay with PCACHE_SEED=${SEED})`);

interface Written {
  off: number;
  data: Buffer;
  /** A FUA write that completed: durable on its own. */
  durable: boolean;
}

/** The device as the last completed flush left it, plus every write since, in order. */
class DurabilityModel {
  readonly flushed = new SparseStore(BACKING_SIZE);
  readonly current = new SparseStore(BACKING_SIZE);
  pending: Written[] = [];

  write(w: Written): void {
    this.current.write(w.data, w.off);
    this.pending.push(w);
  }

  flush(): void {
    for (const w of this.pending) this.flushed.write(w.data, w.off);
    this.pending = [];
  }

  /** Check a recovered image: each sector holds its flushed value or a value written later. */
  check(recovered: SparseStore, what: string): void {
    const bySector = new Map<number, Written[]>();
    for (const w of this.pending) {
      for (let s = w.off / SECTOR; s < (w.off + w.data.length) / SECTOR; s++) {
        let l = bySector.get(s);
        if (!l) bySector.set(s, (l = []));
        l.push(w);
      }
    }
    const CH = MiB;
    const got = Buffer.allocUnsafe(CH);
    const want = Buffer.allocUnsafe(CH);
    let lost = 0;
    for (let off = 0; off < BACKING_SIZE; off += CH) {
      recovered.read(got, off);
      this.flushed.read(want, off);
      if (got.equals(want)) {
        // Equal to the flushed image: wrong only where a FUA write since must have survived.
        for (let s = off / SECTOR; s < (off + CH) / SECTOR; s++) {
          const ws = bySector.get(s);
          if (!ws?.some((w) => w.durable)) continue;
          this.checkSector(s, got.subarray(s * SECTOR - off, (s + 1) * SECTOR - off), want.subarray(s * SECTOR - off, (s + 1) * SECTOR - off), ws, what);
        }
        continue;
      }
      for (let s = off / SECTOR; s < (off + CH) / SECTOR; s++) {
        const g = got.subarray(s * SECTOR - off, (s + 1) * SECTOR - off);
        const f = want.subarray(s * SECTOR - off, (s + 1) * SECTOR - off);
        const ws = bySector.get(s) ?? [];
        if (ws.length === 0 && !g.equals(f)) {
          lost++;
          assert.fail(`${what}: sector ${s} (byte ${s * SECTOR}) lost its flushed data, and nothing was written there since`);
        }
        this.checkSector(s, g, f, ws, what);
      }
    }
    assert.equal(lost, 0);
  }

  /** Where two images differ, and which write each holds there (for failure messages). */
  explain(a: Buffer, b: Buffer): string {
    let i = 0;
    while (i < a.length && a[i] === b[i]) i++;
    const s = Math.floor(i / SECTOR);
    const which = (img: Buffer): string => {
      const got = img.subarray(s * SECTOR, (s + 1) * SECTOR);
      const f = this.flushed.read(Buffer.allocUnsafe(SECTOR), s * SECTOR);
      if (got.equals(f)) return 'the flushed value';
      const idx = this.pending.findIndex((w) => w.off <= s * SECTOR && s * SECTOR < w.off + w.data.length && w.data.subarray(s * SECTOR - w.off, s * SECTOR - w.off + SECTOR).equals(got));
      return idx >= 0 ? `pending write #${idx} of ${this.pending.length}` : 'nothing known';
    };
    let last = s;
    while ((last + 1) * SECTOR < a.length && !a.subarray((last + 1) * SECTOR, (last + 2) * SECTOR).equals(b.subarray((last + 1) * SECTOR, (last + 2) * SECTOR))) last++;
    return `sectors ${s}..${last} (byte ${s * SECTOR}): first holds ${which(a)}, second holds ${which(b)}`;
  }

  private checkSector(s: number, got: Buffer, flushed: Buffer, ws: Written[], what: string): void {
    const slice = (w: Written): Buffer => w.data.subarray(s * SECTOR - w.off, s * SECTOR - w.off + SECTOR);
    // From the last write that was durable on its own (FUA), or else from the flushed value, on.
    let from = -1;
    ws.forEach((w, i) => {
      if (w.durable) from = i;
    });
    const allowed = from >= 0 ? ws.slice(from).map(slice) : [flushed, ...ws.map(slice)];
    if (!allowed.some((a) => a.equals(got))) {
      assert.fail(`${what}: sector ${s} (byte ${s * SECTOR}) holds neither its durable value nor a later write (${allowed.length} candidates)`);
    }
  }
}

function randomRange(rng: Rng, hot: number, big = false): { off: number; len: number } {
  const len = big
    ? (2048 + rng.int(6 * 2048)) * SECTOR // 1 MiB .. 7 MiB
    : Math.floor(Math.exp(rng.next() * Math.log(512))) * SECTOR; // 512 B .. 256 KiB
  const base = rng.next() < 0.6 ? hot : 0;
  const span = base === hot ? 4 * MiB : BACKING_SIZE;
  const off = Math.min(BACKING_SIZE - len, base + rng.int(span / SECTOR) * SECTOR);
  return { off, len };
}

interface Crashed {
  seed: number;
  cacheImage: SparseStore;
  backingImage: SparseStore;
  model: DurabilityModel;
}

async function runToCrash(seed: number, opts: { dataCrc: boolean; gcPercent: number; big?: boolean; logNearEnd?: boolean }): Promise<Crashed> {
  const rng = seededRng(seed);
  const medium = new CrashStoreMedium(CACHE_SIZE);
  // The log starts near the end of its segment: it moves on (a LAST kset) before the crash.
  if (opts.logNearEnd) await formatWithLogNearEnd(medium, opts);
  const backing = new CrashStoreBacking(BACKING_SIZE);
  const model = new DurabilityModel();
  const cache = await Cache.open(medium, backing, { dataCrc: opts.dataCrc, gcPercent: opts.gcPercent, writebackIntervalMs: 10, ksetCloseMs: 15 });
  const big = opts.big ?? false;
  const hot = rng.int((BACKING_SIZE - 4 * MiB) / SECTOR) * SECTOR;
  // Big writes go round the whole cache, so that segments are freed and reused before the crash.
  const steps = 150 + rng.int(250);
  let bytes = 0;
  for (let step = 0; big ? bytes < 640 * MiB : step < steps; step++) {
    const r = rng.next();
    if (r < 0.55) {
      const { off, len } = randomRange(rng, hot, big && rng.next() < 0.8);
      const fua = rng.next() < 0.12;
      const data = len > MiB ? quickPattern(rng, len) : pattern(rng, len);
      await cache.write(off, data, { fua });
      model.write({ off, data, durable: fua });
      bytes += len;
    } else if (r < 0.7) {
      // A few disjoint writes in flight together.
      const batch: Written[] = [];
      for (let i = 0; i < 2 + rng.int(3); i++) {
        const { off, len } = randomRange(rng, hot);
        if (batch.some((b) => off < b.off + b.data.length && b.off < off + len)) continue;
        batch.push({ off, data: pattern(rng, len), durable: false });
      }
      await Promise.all(batch.map((w) => cache.write(w.off, w.data)));
      for (const w of batch) model.write(w);
    } else if (r < 0.8) {
      await cache.flush();
      model.flush();
    } else if (r < 0.9) {
      const { off, len } = randomRange(rng, hot);
      const got = await cache.read(off, len);
      assert.ok(got.equals(model.current.read(Buffer.allocUnsafe(len), off)), `seed ${seed} step ${step}: read at ${off}+${len}`);
    } else {
      await sleep(rng.int(25)); // let write-back and GC move on
    }
  }
  if (opts.logNearEnd) {
    // How many kset bytes the workload wrote depends on its seed and on timed kset closes: when
    // they did not fill the room left in segment 0, flushed writes go on until the log moves.
    for (let i = 0; cache.keyHead.seg === 0 && i < 1000; i++) {
      const { off, len } = randomRange(rng, hot);
      const data = pattern(rng, len);
      await cache.write(off, data);
      model.write({ off, data, durable: false });
      await cache.flush();
      model.flush();
    }
  }
  // Power fails with a few writes in flight, at a random point of their progress.
  const inflight: Array<Promise<void>> = [];
  for (let i = 0; i < rng.int(4); i++) {
    const { off, len } = randomRange(rng, hot);
    const data = pattern(rng, len);
    model.write({ off, data, durable: false });
    inflight.push(cache.write(off, data, { fua: rng.next() < 0.3 }).catch(() => undefined));
  }
  for (let i = rng.int(6); i > 0; i--) await new Promise((res) => setImmediate(res));
  const reused = cache.status().counters.segmentsFreed;
  if (opts.logNearEnd) assert.notEqual(cache.keyHead.seg, 0, 'the log moved to another segment before the crash');
  const cacheImage = medium.img.crash(rng, true);
  const backingImage = backing.img.crash(rng, true);
  await cache.abandon();
  await Promise.all(inflight);
  medium.img.current.release();
  backing.img.current.release();
  if (big) assert.ok(reused > 0, `segments were freed and reused before the crash (${reused})`);
  return { seed, cacheImage, backingImage, model };
}

/** Open a cache on the images (replay must succeed) and read the whole device through it. */
async function recover(medium: StoreMedium, backing: StoreBacking, c: Crashed): Promise<{ cache: Cache; recovered: SparseStore }> {
  const cache = await Cache.open(medium, backing, FAST);
  const recovered = new SparseStore(BACKING_SIZE);
  for (let off = 0; off < BACKING_SIZE; off += 4 * MiB) recovered.write(await cache.read(off, 4 * MiB), off);
  c.model.check(recovered, `seed ${c.seed}`);
  return { cache, recovered };
}

async function writeSparse(path: string, store: SparseStore): Promise<void> {
  const fh = await open(path, 'w');
  try {
    await fh.truncate(store.size);
    for (const { off, data } of store.extents()) await fh.write(data, 0, data.length, off);
  } finally {
    await fh.close();
  }
}

const ROUNDS = [
  { dataCrc: false, gcPercent: 0 },
  { dataCrc: true, gcPercent: 70 },
  { dataCrc: true, gcPercent: 0 },
  { dataCrc: false, gcPercent: 90 },
  { dataCrc: true, gcPercent: 0, big: true },
  { dataCrc: false, gcPercent: 0, logNearEnd: true },
];

for (const [i, opts] of ROUNDS.entries()) {
  test(`unclean stop, data_crc ${opts.dataCrc}, gc_percent ${opts.gcPercent}${opts.big ? ', segments reused' : ''}${opts.logNearEnd ? ', log across segments' : ''}: replay keeps every flushed write; write-back then makes the backing equal (seed ${SEED})`, { timeout: 120_000 }, async () => {
    const crashed = await runToCrash((SEED + i * 7919) >>> 0, opts);
    const seed = crashed.seed;
    if (i === 0) {
      // Replay on copies; then the offline drain, as a child process, on the images as sparse files.
      const rec = await recover(new StoreMedium(crashed.cacheImage.clone()), new StoreBacking(crashed.backingImage.clone()), crashed);
      await rec.cache.close();
      const dir = await tempDir('pcache-crash-');
      const cachePath = join(dir, 'cache.img');
      const backingPath = join(dir, 'backing.img');
      await writeSparse(cachePath, crashed.cacheImage);
      await writeSparse(backingPath, crashed.backingImage);
      const res = await runPcache(['writeback', cachePath, backingPath]);
      assert.equal(res.code, 0, `pcache writeback failed: ${res.stderr}`);
      assert.match(res.stdout, /the cache is clean/);
      const onBacking = await readFile(backingPath);
      const want = rec.recovered.read(Buffer.allocUnsafe(BACKING_SIZE), 0);
      if (!onBacking.equals(want)) assert.fail(`seed ${seed}: after pcache writeback the backing device differs from what replay recovered: ${crashed.model.explain(onBacking, want)}`);
      // And the cache it left is clean and consistent: it opens with nothing to write back.
      const medium = await openFileMedium(cachePath);
      const backing = await openFileBacking(backingPath);
      const cache = await Cache.open(medium, backing, FAST);
      assert.ok(samePosition(cache.dirtyTail, cache.keyHead), 'clean: dirty_tail = key_head');
      assert.ok((await cache.read(0, 4 * MiB)).equals(want.subarray(0, 4 * MiB)));
      await cache.close();
      await medium.close();
      await backing.close();
    } else {
      // In process: the drain leaves the backing equal to what replay recovered.
      const backing = new StoreBacking(crashed.backingImage);
      const rec = await recover(new StoreMedium(crashed.cacheImage), backing, crashed);
      await rec.cache.drain({ maxErrors: 0 });
      await rec.cache.close();
      const at = backing.store.firstDiff(rec.recovered);
      assert.equal(at, -1, `seed ${seed}: after the drain the backing device differs from the recovered image at byte ${at}`);
    }
    for (const s of [crashed.cacheImage, crashed.backingImage, crashed.model.flushed, crashed.model.current]) s.release();
  });
}
