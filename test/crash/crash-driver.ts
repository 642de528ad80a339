/**
 * The crash driver: simulated power cuts under a random workload, with write-back and GC running.
 *
 * A *lineage* is one cache device and one backing device. It runs a random workload (mixed sizes,
 * overlaps, FUA writes, flushes, zeroing writes, reads) until a chosen moment: any time, or inside
 * a kset write, a log segment switch, a key_tail or dirty_tail update, a generation bump, a
 * write-back batch (a merged backing write of adjacent keys among them) or its flush, a read of
 * the cache device while write-back holds several ksets read ahead, a data write or a sync. There the power is cut: both devices
 * yield a crash image (synced writes, plus any subset of unsynced ones, torn at 512 B), the engine
 * is abandoned, `checkCache` must pass on the image, the cache is reopened from the two images,
 * and every sector written since the last crash point (and a sample of the rest) is read back and
 * judged by the Model: durable writes survive, nothing reads as garbage or another sector's data,
 * the backing device holds no value the cache lost and is one prefix of the log. Sometimes the
 * cache is drained and the backing device must then equal the cache's view. The workload then
 * goes on from the reopened cache to the next crash point.
 */
import { Cache, type CacheOptions } from '../../src/cache/cache.js';
import { checkCache } from '../../src/cache/check.js';
import { dumpCache } from '../../src/cache/dump.js';
import { formatCache } from '../../src/cache/format.js';
import {
  CACHE_CTRL_OFF,
  dataOffset,
  decodeKset,
  dirtyTailOffset,
  encodePosition,
  FormatError,
  KEY_FLAG_CLEAN,
  keyTailOffset,
  KSET_HEADER_SIZE,
  KSET_MAGIC,
  SEG_DATA_OFF,
  SEG_DATA_SIZE,
  SEG_GEN_OFF,
  SEG_SIZE,
  SEGMENTS_OFF,
  segmentsFor,
  SUBTREE_SIZE,
} from '../../src/format/index.js';
import type { IssuedIo } from '../../src/media/sparse-crash.js';
import { SparseCrashMedium } from '../../src/media/sparse-crash.js';
import { PAGE, PageImage, PageMedium } from '../../src/media/sparse.js';
import { seededRng, type Rng } from '../helpers/rng.js';
import { SparseCrashBacking } from './devices.js';
import { Model } from './model.js';
import { readSector, SECTOR, tagData, tagSector } from './tags.js';

export const MiB = 1024 * 1024;
export const CACHE_SIZE = 512 * MiB;
export const BACKING_SIZE = 64 * MiB;
const N_SEGS = segmentsFor(CACHE_SIZE);

export interface CrashDriverOptions {
  seed: number;
  /** Crash points to run in all (whole lineages: the last one may take it a little past). */
  crashPoints: number;
  /** Run only this lineage of the seed (to replay a failure quickly). */
  onlyLineage?: number;
  /** Crash points per lineage; default random within 3..16. */
  lineageLength?: number;
  log?: (line: string) => void;
  /** Stop starting lineages after this long (the points done are reported). */
  timeLimitMs?: number;
  /** Run lineages i with i % stride === offset (to share one seed between workers). */
  stride?: number;
  offset?: number;
}

export interface CrashDriverResult {
  seed: number;
  crashPoints: number;
  lineages: number;
  ops: number;
  writes: number;
  bytesWritten: number;
  flushes: number;
  sectorsVerified: number;
  drains: number;
  fullCompares: number;
  /** Crash points by the moment they cut the power at. */
  crashedAt: Record<string, number>;
  /** I/O seen on the two devices, by kind (how often each moment occurred at all). */
  events: Record<string, number>;
  /** Crash points whose planned moment did not come, which crashed at a random time instead. */
  fallbacks: number;
  /** Reopens where replay named a damaged kset at the log's end (a torn last kset). */
  tornLogEnds: number;
  /** Clean shutdowns and restarts in the middle of a lineage. */
  cleanRestarts: number;
  /** Power cuts while a blank device was being formatted. */
  formatCuts: number;
  /** Where the time went. */
  phaseMs: Record<string, number>;
  ms: number;
}

/** Raised for a property violation; carries what is needed to replay it. */
export class CrashFailure extends Error {}

function bump(rec: Record<string, number>, k: string, n = 1): void {
  rec[k] = (rec[k] ?? 0) + n;
}

/** Lineage seeds: independent of how many lineages ran before, so one can be replayed alone. */
function lineageSeed(seed: number, i: number): number {
  let x = (seed ^ Math.imul(i + 1, 0x9e3779b9)) >>> 0;
  x = Math.imul(x ^ (x >>> 16), 0x85ebca6b) >>> 0;
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35) >>> 0;
  return (x ^ (x >>> 16)) >>> 0;
}

/** The backing device's initial content: every sector tagged as write 0, so reads of it are checked too. */
export function initialBackingImage(): PageImage {
  return new PageImage(BACKING_SIZE, (index, page) => {
    for (let at = 0; at < page.length; at += SECTOR) tagSector(page, at, index * PAGE + at, 0);
  });
}

async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new CrashFailure(`hang: ${what} did not finish within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p, t]);
  } finally {
    clearTimeout(timer);
  }
}

const turn = (): Promise<void> => new Promise((r) => setImmediate(r));
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * A backing write that holds more than one write's data (keys adjacent on the backing device that
 * write-back merged into one write): its sectors carry more than one tag, or tags and zeros.
 */
function isMergedWrite(data: Buffer): boolean {
  const idAt = (at: number): number => (data.readUInt32LE(at) === 0 ? -1 : data.readUInt32LE(at + 4));
  const first = idAt(0);
  for (let at = SECTOR; at + SECTOR <= data.length; at += SECTOR) if (idAt(at) !== first) return true;
  return false;
}

/** What an I/O is, in the engine's terms. */
function classify(src: 'medium' | 'backing', io: IssuedIo): string {
  if (src === 'backing') {
    if (io.op === 'write') return isMergedWrite(io.data!) ? 'wb-write-merged' : 'wb-write';
    return io.op === 'flush' ? 'wb-flush' : 'backing-read';
  }
  if (io.op === 'flush') return 'sync';
  if (io.op === 'read') return 'medium-read';
  const off = io.offset;
  if (off >= CACHE_CTRL_OFF && off < CACHE_CTRL_OFF + 64) return off < CACHE_CTRL_OFF + 32 ? 'key-tail' : 'dirty-tail';
  if (off < SEGMENTS_OFF) return 'meta';
  const rel = (off - SEGMENTS_OFF) % SEG_SIZE;
  if (rel >= SEG_GEN_OFF && rel < SEG_GEN_OFF + 32) return 'gen';
  if (rel < SEG_DATA_OFF) return 'segment-meta';
  const d = io.data!;
  if (d.length >= KSET_HEADER_SIZE && d.readBigUInt64LE(8) === KSET_MAGIC) return d.readBigUInt64LE(16) & 1n ? 'last-kset' : 'kset';
  // 24 zeros: at a segment's start, the end of the log a segment switch writes; elsewhere the end
  // marker written (and synced) before a kset.
  if (d.length === KSET_HEADER_SIZE && d.every((b) => b === 0)) return rel === SEG_DATA_OFF ? 'log-end' : 'kset-trailer';
  return 'data';
}

/** Where to cut the power: at the nth I/O of a kind, or at the sync following it; or at a random time. */
interface Plan {
  kind: string;
  nth: number;
  /** Cut at the first sync issued after the nth event (the update is written, not yet durable). */
  atNextSync: boolean;
}

const PLANS: Array<[string, number, boolean, number]> = [
  // kind, weight, at the next sync, nth up to
  ['time', 16, false, 1],
  ['kset', 10, false, 12],
  ['kset', 3, true, 6],
  ['kset-trailer', 3, false, 6],
  ['kset-trailer', 2, true, 6],
  ['log-end', 4, false, 1],
  ['log-end', 3, true, 1],
  ['last-kset', 4, false, 1],
  ['key-tail', 6, false, 3],
  ['key-tail', 3, true, 3],
  ['dirty-tail', 6, false, 6],
  ['dirty-tail', 3, true, 6],
  ['gen', 6, false, 3],
  ['gen', 3, true, 3],
  ['wb-write', 8, false, 24],
  ['wb-write-unsynced', 6, false, 4],
  ['wb-write-merged', 8, false, 2],
  ['wb-read-ahead', 6, false, 8],
  ['dirty-tail-unsynced', 6, false, 2],
  ['wb-flush', 5, false, 6],
  ['data', 5, false, 40],
  ['sync', 5, false, 20],
  ['reuse', 4, false, 1],
  ['meta', 2, false, 1],
  ['meta', 1, true, 1],
];
const SWITCH_PLANS = PLANS.filter((p) => p[0] === 'log-end' || p[0] === 'last-kset');
/** Moments only garbage collection brings. */
const GC_KINDS = new Set(['key-tail', 'gen', 'reuse']);

/**
 * A moment the lineage can reach: a segment switch only when the log is near a segment's end,
 * GC's moments only when GC runs.
 */
function pickPlan(rng: Rng, nearSwitch: boolean, gcActive: boolean): Plan {
  let table = nearSwitch && rng.next() < 0.8 ? SWITCH_PLANS : PLANS.filter((p) => p[0] !== 'log-end' && p[0] !== 'last-kset');
  if (!gcActive) table = table.filter((p) => !GC_KINDS.has(p[0]));
  const total = table.reduce((n, p) => n + p[1], 0);
  let r = rng.next() * total;
  for (const [kind, w, atNextSync, maxNth] of table) {
    r -= w;
    if (r < 0) return { kind, nth: 1 + rng.int(maxNth), atNextSync };
  }
  return { kind: 'time', nth: 1, atNextSync: false };
}

type Op =
  | { kind: 'read'; off: number; len: number }
  | { kind: 'write'; off: number; len: number; fua: boolean }
  | { kind: 'zero'; off: number; len: number }
  | { kind: 'flush' }
  /** A dm-pcache message: rewrites cache_info. */
  | { kind: 'gc-percent'; n: number }
  /** A clean shutdown and restart (alone in its batch). */
  | { kind: 'close' };

class Workload {
  private hot = 0;
  private hotSize = 4 * MiB;

  constructor(private readonly rng: Rng) {
    this.moveHot();
  }

  moveHot(): void {
    this.hotSize = (1 + this.rng.int(8)) * MiB;
    this.hot = this.rng.int((BACKING_SIZE - this.hotSize) / SECTOR) * SECTOR;
  }

  private length(): number {
    if (this.rng.next() < 0.01) return (1024 + this.rng.int(1025)) * SECTOR;
    const sectors = Math.floor(Math.exp(this.rng.next() * Math.log(256)));
    return Math.max(1, Math.min(256, sectors)) * SECTOR;
  }

  private range(): { off: number; len: number } {
    const len = this.length();
    const r = this.rng.next();
    let off: number;
    if (r < 0.55) off = this.hot + this.rng.int(this.hotSize / SECTOR) * SECTOR;
    else if (r < 0.65) off = (1 + this.rng.int(BACKING_SIZE / SUBTREE_SIZE - 1)) * SUBTREE_SIZE - len / 2;
    else off = this.rng.int(BACKING_SIZE / SECTOR) * SECTOR;
    off = Math.max(0, Math.min(BACKING_SIZE - len, off));
    off -= off % SECTOR;
    return { off, len };
  }

  op(): Op {
    if (this.rng.next() < 0.02) this.moveHot();
    const r = this.rng.next();
    if (r < 0.48) return { kind: 'write', ...this.range(), fua: false };
    if (r < 0.56) return { kind: 'write', ...this.range(), fua: true };
    if (r < 0.57) return { kind: 'zero', ...this.range() };
    if (r < 0.66) return { kind: 'flush' };
    if (r < 0.67) return { kind: 'gc-percent', n: pick(this.rng, [0, 5, 10, 50, 70, 90]) };
    if (r < 0.675) return { kind: 'close' };
    return { kind: 'read', ...this.range() };
  }
}

function overlaps(a: { off: number; len: number }, b: { off: number; len: number }): boolean {
  return a.off < b.off + b.len && b.off < a.off + a.len;
}

interface LineageConfig {
  dataCrc: boolean;
  gcPercent: number;
  writebackIntervalMs: number;
  ksetCloseMs: number;
  /** Start with the log near the end of a segment, so that it switches segments soon. */
  aged: boolean;
}

function pick<T>(rng: Rng, xs: readonly T[]): T {
  return xs[rng.int(xs.length)]!;
}

/** A formatted cache whose (empty) log starts within 32 KiB of the end of a segment, as after long use. */
async function agedImage(rng: Rng, cfg: LineageConfig): Promise<PageImage> {
  const img = new PageImage(CACHE_SIZE);
  const m = new PageMedium(img);
  const f = await formatCache(m, { dataCrc: cfg.dataCrc, gcPercent: cfg.gcPercent, mode: 'writeback' });
  if (f instanceof FormatError) throw new Error(f.message);
  const seg = rng.int(N_SEGS);
  const off = SEG_DATA_SIZE - KSET_HEADER_SIZE - 8 * rng.int(rng.next() < 0.7 ? 512 : 4096);
  await m.write(Buffer.alloc(KSET_HEADER_SIZE), dataOffset(seg, off));
  await m.write(encodePosition({ seq: 2, seg, off }), keyTailOffset(1));
  await m.write(encodePosition({ seq: 2, seg, off }), dirtyTailOffset(1));
  return img;
}

/** Sorted sectors grouped into runs of at most `max` sectors. */
function runs(sectors: number[], max: number): Array<{ s: number; n: number }> {
  sectors.sort((a, b) => a - b);
  const out: Array<{ s: number; n: number }> = [];
  for (const s of sectors) {
    const last = out[out.length - 1];
    if (last && last.s + last.n === s && last.n < max) last.n++;
    else if (!last || s >= last.s + last.n) out.push({ s, n: 1 });
  }
  return out;
}

async function inParallel<T>(items: readonly T[], width: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(width, items.length) }, worker));
}

class Lineage {
  private readonly rng: Rng;
  private readonly cfg: LineageConfig;
  private readonly model = new Model(BACKING_SIZE);
  private readonly work: Workload;
  private medium!: SparseCrashMedium;
  private backing!: SparseCrashBacking;
  private cache!: Cache;
  private point = 0;
  private cutAt = '';
  /** Physical segments whose generation bump was issued and that no data was written to since. */
  private readonly bumped = new Set<number>();

  constructor(
    readonly seed: number,
    readonly index: number,
    private readonly res: CrashDriverResult,
    private readonly log: (line: string) => void,
  ) {
    this.rng = seededRng(lineageSeed(seed, index));
    const rng = this.rng;
    this.cfg = {
      dataCrc: rng.next() < 0.3,
      gcPercent: pick(rng, [0, 0, 5, 10, 20, 50, 70]),
      writebackIntervalMs: pick(rng, [1, 5, 20, 100]),
      ksetCloseMs: pick(rng, [1, 5, 20, 200]),
      aged: rng.next() < 0.5,
    };
    this.work = new Workload(rng);
  }

  get where(): string {
    return `seed ${this.seed} lineage ${this.index} crash point ${this.point} (${JSON.stringify(this.cfg)})`;
  }

  private phaseStart = Date.now();
  /** Time spent per phase (PCACHE_CRASH_DEBUG=1 prints it). */
  private phase(name: string): void {
    const now = Date.now();
    bump(this.res.phaseMs, name, now - this.phaseStart);
    this.phaseStart = now;
  }

  private fail(msg: string): never {
    throw new CrashFailure(`${msg}\n  at ${this.where}\n  replay: PCACHE_SEED=${this.seed} PCACHE_LINEAGE=${this.index}`);
  }

  private get opts(): CacheOptions {
    return { dataCrc: this.cfg.dataCrc, gcPercent: this.cfg.gcPercent, writebackIntervalMs: this.cfg.writebackIntervalMs, ksetCloseMs: this.cfg.ksetCloseMs };
  }

  async run(points: number): Promise<void> {
    const base = this.cfg.aged ? await agedImage(this.rng, this.cfg) : new PageImage(CACHE_SIZE);
    this.medium = new SparseCrashMedium(base, 'crash-cache');
    this.backing = new SparseCrashBacking(initialBackingImage(), 'crash-backing');
    if (!this.cfg.aged && this.rng.next() < 0.15) await this.cutWhileFormatting();
    else this.cache = await withTimeout(Cache.open(this.medium, this.backing, this.opts), 20_000, 'opening a fresh cache');
    for (this.point = 0; this.point < points; this.point++) {
      await this.crashPoint();
      this.res.crashPoints++;
    }
    await this.finish();
  }

  /**
   * Cut the power at a random write or sync of the format of a blank device: the device must then
   * open as blank (and be formatted again) or as formatted, never as something in between.
   */
  private async cutWhileFormatting(): Promise<void> {
    const medium = this.medium;
    const target = 1 + this.rng.int(140);
    const keep = pick(this.rng, [0, 0.5, 1]);
    const crashRng = seededRng(this.rng.int(2 ** 32));
    let n = 0;
    let img: PageImage | null = null;
    medium.onIssue = (io) => {
      if (img || io.op === 'read' || ++n !== target) return;
      img = medium.crash(crashRng.next, { keep });
      medium.kill();
    };
    try {
      this.cache = await withTimeout(Cache.open(medium, this.backing, this.opts), 20_000, 'formatting');
    } catch (err) {
      if (!img) throw err;
    }
    medium.onIssue = undefined;
    if (!img) return;
    this.res.formatCuts++;
    bump(this.res.crashedAt, 'format');
    await this.cache?.abandon();
    const report = await checkCache(new PageMedium((img as PageImage).clone()), { backingSize: BACKING_SIZE });
    const blank = report.problems.some((p) => /not formatted/.test(p));
    if (!report.clean && !blank) this.fail(`a power cut while formatting left: ${report.problems.join('; ')}`);
    this.medium = new SparseCrashMedium(img, 'crash-cache');
    this.cache = await withTimeout(Cache.open(this.medium, this.backing, this.opts), 20_000, 'opening after a power cut while formatting');
  }

  /** Run the workload to the planned moment, cut the power, reopen, verify. */
  private async crashPoint(): Promise<void> {
    const { rng, model, res, log } = this;
    this.phase('other');
    const st = this.cache.status();
    const nearSwitch = st.keyHead.off > SEG_DATA_SIZE - 64 * 1024;
    // GC runs when the used segments reach gc_percent (a little early: the workload adds some).
    const gcActive = (st.segsUsed + 2) * 100 >= this.cfg.gcPercent * st.nSegs;
    const plan = pickPlan(rng, nearSwitch, gcActive);
    const keepM = pick(rng, [0.5, 0.5, 0, 1, rng.next()]);
    const keepB = pick(rng, [0.5, 0.5, 0, 1, rng.next()]);
    let images: { m: PageImage; b: PageImage; at: string } | null = null;
    let onCrash: () => void = () => undefined;
    const crashed = new Promise<void>((r) => (onCrash = r));
    const crashRng = seededRng(rng.int(2 ** 32));
    const medium = this.medium;
    const backing = this.backing;
    const cut = (at: string): void => {
      if (images) return;
      images = { m: medium.crash(crashRng.next, { keep: keepM }), b: backing.crash(crashRng.next, { keep: keepB }), at };
      medium.kill();
      backing.kill();
      medium.onIssue = undefined;
      backing.onIssue = undefined;
      onCrash();
    };
    let seen = 0;
    let armedSync = false;
    let unsyncedKsets = 0;
    const planLabel = `${plan.kind}${plan.atNextSync ? '+sync' : ''}`;
    const observe = (src: 'medium' | 'backing', io: IssuedIo): void => {
      let kind = classify(src, io);
      // The first data written into a segment after its generation bump was issued: the moment a
      // freed segment is reused (its new generation must be durable by then).
      if (src === 'medium' && (kind === 'gen' || kind === 'data')) {
        const phys = Math.floor((io.offset - SEGMENTS_OFF) / SEG_SIZE);
        if (kind === 'gen') this.bumped.add(phys);
        else if (this.bumped.delete(phys)) kind = 'reuse';
      }
      bump(res.events, kind);
      if (kind === 'kset') {
        const k = decodeKset(io.data!, N_SEGS);
        if (!(k instanceof FormatError) && !k.last) model.ksetWritten(k.keys.filter((key) => !(key.flags & KEY_FLAG_CLEAN)));
      }
      // Write-back or its dirty_tail update while some kset written is not yet covered by a sync:
      // where acting on a kset before it is durable would show.
      if (kind === 'kset' || kind === 'last-kset') unsyncedKsets++;
      else if (kind === 'sync') unsyncedKsets = 0;
      // A merged write is a write-back write too (its n-th counts for both).
      const isWbWrite = kind === 'wb-write' || kind === 'wb-write-merged';
      let alias = unsyncedKsets > 0 && (isWbWrite || kind === 'dirty-tail') ? `${isWbWrite ? 'wb-write' : kind}-unsynced` : null;
      if (kind === 'wb-write-merged' && !alias) alias = 'wb-write';
      // A read of the cache device while write-back holds two or more ksets read ahead of the one
      // it writes back: their data is being read, their segments pinned.
      if (src === 'medium' && kind === 'medium-read' && this.cache.status().counters.writebackKsetsAhead >= 2) alias = 'wb-read-ahead';
      if (alias) bump(res.events, alias);
      if (plan.kind === 'time') return;
      if (armedSync && kind === 'sync') return cut(planLabel);
      if ((kind === plan.kind || alias === plan.kind) && ++seen === plan.nth) {
        if (plan.atNextSync) armedSync = true;
        else cut(planLabel);
      }
    };
    medium.onIssue = (io) => observe('medium', io);
    backing.onIssue = (io) => observe('backing', io);

    const errors: unknown[] = [];
    const track = <T>(p: Promise<T>, ok: (v: T) => void): void => {
      p.then(
        (v) => {
          if (!images) ok(v);
        },
        (err) => {
          if (!images) errors.push(err);
        },
      );
    };
    const opsPlanned = 20 + rng.int(60);
    const timeAt = plan.kind === 'time' ? rng.int(opsPlanned) : -1;
    let ops = 0;
    while (!images && ops < opsPlanned * 2) {
      if (ops >= opsPlanned && plan.kind === 'time') break;
      const batch = this.batch();
      const done: Promise<unknown>[] = [];
      for (const op of batch) done.push(this.issue(op, track));
      ops += batch.length;
      res.ops += batch.length;
      if (timeAt >= 0 && ops > timeAt) {
        const turns = rng.int(8);
        for (let i = 0; i < turns && !images; i++) await turn();
        cut('time');
      }
      await Promise.race([Promise.allSettled(done), crashed]);
      if (errors.length) this.fail(`a request failed before the crash: ${String((errors[0] as Error)?.stack ?? errors[0])}`);
    }
    if (!images && plan.kind !== 'time') {
      // Background work (write-back, GC) may still bring the planned moment.
      await Promise.race([crashed, sleep(Math.min(30, 5 + this.cfg.writebackIntervalMs))]);
    }
    if (!images) {
      res.fallbacks++;
      cut(`fallback (planned ${planLabel})`);
    }
    const img = images as unknown as { m: PageImage; b: PageImage; at: string };
    this.phase('workload');
    if (process.env.PCACHE_CRASH_DEBUG) {
      const st = this.cache.status();
      log(`point ${this.point}: ${ops} ops, cut at ${img.at}, segs used ${st.segsUsed}, head ${st.keyHead.seg}:${st.keyHead.off} dirty ${st.dirtyTail.seg}:${st.dirtyTail.off} key ${st.keyTail.seg}:${st.keyTail.off} counters ${JSON.stringify(st.counters)}`);
    }
    bump(res.crashedAt, img.at.startsWith('fallback') ? 'time (fallback)' : img.at);
    this.cutAt = img.at;
    await withTimeout(this.cache.abandon(), 10_000, 'abandoning the cache after the crash');
    this.phase('abandon');
    model.crashed();
    await this.afterCrash(img.m, img.b);
  }

  private batch(): Op[] {
    const batch: Op[] = [];
    const want = 1 + this.rng.int(6);
    for (let tries = 0; batch.length < want && tries < 20; tries++) {
      const op = this.work.op();
      if (op.kind === 'close') {
        if (batch.length === 0) return [op];
        continue;
      }
      if (op.kind === 'gc-percent') {
        batch.push(op);
        continue;
      }
      if (op.kind !== 'flush' && batch.some((b) => 'off' in b && (op.kind !== 'read' || b.kind !== 'read') && overlaps(op, b))) continue;
      batch.push(op);
    }
    return batch;
  }

  private issue(op: Op, track: <T>(p: Promise<T>, ok: (v: T) => void) => void): Promise<unknown> {
    const { model, cache, res } = this;
    switch (op.kind) {
      case 'write': {
        const id = model.issueWrite(op.off, op.len, { zero: false, fua: op.fua });
        const p = cache.write(op.off, tagData(op.off, op.len, id), { fua: op.fua });
        res.writes++;
        res.bytesWritten += op.len;
        track(p, () => model.ackWrite(id));
        return p;
      }
      case 'zero': {
        const id = model.issueWrite(op.off, op.len, { zero: true, fua: false });
        const p = cache.writeZeroes(op.off, op.len);
        res.writes++;
        track(p, () => model.ackWrite(id));
        return p;
      }
      case 'flush': {
        const covered = model.issueFlush();
        const p = cache.flush();
        res.flushes++;
        track(p, () => model.completeFlush(covered));
        return p;
      }
      case 'gc-percent': {
        const p = cache.setGcPercent(op.n);
        track(p, () => undefined);
        return p;
      }
      case 'close': {
        // A clean shutdown makes every acknowledged write durable, then the cache starts again.
        const covered = model.issueFlush();
        const p = cache.close().then(async () => {
          if (this.medium.killed) return;
          model.completeFlush(covered);
          res.cleanRestarts++;
          this.cache = await Cache.open(this.medium, this.backing, this.opts);
        });
        track(p, () => undefined);
        return p;
      }
      case 'read': {
        // No write to this range is in flight: the read must return exactly the newest data.
        const expect: number[] = [];
        for (let s = op.off / SECTOR; s < (op.off + op.len) / SECTOR; s++) expect.push(model.latest(s));
        const p = cache.read(op.off, op.len);
        track(p, (buf) => {
          for (let i = 0; i < expect.length; i++) {
            const v = readSector(buf, i * SECTOR, op.off + i * SECTOR);
            if (!model.matches(v, expect[i]!)) {
              this.fail(
                `read of ${op.off}+${op.len} before any crash: sector ${op.off / SECTOR + i} returned ` +
                  `${v.kind === 'tag' ? model.describe(v.id) : v.kind === 'zero' ? 'zeroes' : `garbage (${v.why})`}, expected ${model.describe(expect[i]!)}`,
              );
            }
          }
        });
        return p;
      }
    }
  }

  private async afterCrash(mImg: PageImage, bImg: PageImage): Promise<void> {
    const { model, res, rng } = this;
    if (model.strayKeys.length) this.fail(`keys in the log that no write explains: ${model.strayKeys.join('; ')}`);
    const report = await withTimeout(checkCache(new PageMedium(mImg.clone(), 'crash-image'), { backingSize: BACKING_SIZE }), 20_000, 'checkCache');
    if (!report.clean) this.fail(`checkCache on the crash image: ${report.problems.join('; ')}`);
    const dump = await withTimeout(dumpCache(new PageMedium(mImg.clone(), 'crash-image')), 20_000, 'dumpCache');
    if (dump.errors.length) this.fail(`dumpCache on the crash image: ${dump.errors.join('; ')}`);
    if (dump.log?.end.seg !== report.keyHead?.seg || dump.log?.end.off !== report.keyHead?.off) this.fail('dump and check disagree on where the log ends');
    // Sectors the replayed log keys, oldest first: replay taking an old key for live (a stale key
    // whose segment was reused, a kset from an earlier lap) shows there, not in what was written.
    const keyed: number[] = [];
    const ksets = (dump.log?.ksets ?? []).filter((k) => !k.last);
    const keyedSectors = (k: { off: number; len: number }): void => {
      for (let s = k.off / SECTOR; s < (k.off + k.len) / SECTOR && keyed.length < 1024; s++) keyed.push(s);
    };
    for (const k of ksets.slice(0, 16)) for (const key of k.last ? [] : k.keys) if (!key.stale) keyedSectors(key);
    for (let i = 0; i < 16 && ksets.length; i++) {
      const k = ksets[rng.int(ksets.length)]!;
      if (!k.last && k.keys.length) keyedSectors(k.keys[rng.int(k.keys.length)]!);
    }
    this.phase('check');

    this.medium = new SparseCrashMedium(mImg, 'crash-cache');
    this.backing = new SparseCrashBacking(bImg, 'crash-backing');
    try {
      this.cache = await withTimeout(Cache.open(this.medium, this.backing, this.opts), 20_000, 'reopening after the crash');
    } catch (err) {
      this.fail(`the cache does not open after a power cut: ${(err as Error).stack ?? String(err)}`);
    }
    if (this.cache.replayNote) res.tornLogEnds++;
    this.phase('open');

    // Everything that may have changed, and a sample of what may not.
    const sectors = new Set(model.sectorsToVerify());
    for (const s of keyed) sectors.add(s);
    for (let i = 0; i < 24; i++) sectors.add(rng.int(model.nSectors));
    for (let i = 0; i < 2; i++) {
      const s = rng.int(model.nSectors - 64);
      for (let j = 0; j < 64; j++) sectors.add(s + j);
    }
    const v = model.verification();
    await inParallel(runs([...sectors], 256), 8, async ({ s, n }) => {
      const off = s * SECTOR;
      let buf: Buffer;
      try {
        buf = await withTimeout(this.cache.read(off, n * SECTOR), 20_000, `reading ${off}+${n * SECTOR} after the crash`);
      } catch (err) {
        this.fail(`read of ${off}+${n * SECTOR} after the crash failed: ${(err as Error).stack ?? String(err)}`);
      }
      const bbuf = bImg.slice(off, n * SECTOR);
      for (let i = 0; i < n; i++) {
        try {
          v.check(s + i, readSector(buf, i * SECTOR, off + i * SECTOR), readSector(bbuf, i * SECTOR, off + i * SECTOR));
        } catch (err) {
          this.fail(`after a crash at ${this.cutAt}: ${(err as Error).message}`);
        }
      }
    });
    const order = v.orderProblem();
    if (order) this.fail(order);
    v.commit();
    res.sectorsVerified += v.sectors;
    this.phase('verify');

    if (rng.next() < 0.2) await this.drainAndCompare(false);
  }

  /** Drain: afterwards the backing device must equal the cache's view (sampled, or whole). */
  private async drainAndCompare(whole: boolean): Promise<void> {
    const { model, res, rng } = this;
    try {
      await withTimeout(this.cache.drain({ maxErrors: 0 }), 60_000, 'drain');
    } catch (err) {
      this.fail(`drain failed: ${(err as Error).stack ?? String(err)}`);
    }
    res.drains++;
    this.phase('drain');
    const check = (s: number, got: Buffer, at: number): void => {
      const val = readSector(got, at, s * SECTOR);
      if (!model.matches(val, model.view[s]!)) {
        const desc = val.kind === 'tag' ? model.describe(val.id) : val.kind === 'zero' ? 'zeroes' : `garbage (${val.why})`;
        this.fail(`after drain the backing sector ${s} holds ${desc}, the cache ${model.describe(model.view[s]!)}`);
      }
    };
    if (whole) {
      // Pages never written hold the initial content (write 0) by construction: only check that
      // the model expects it there; read and check every page written.
      const page = Buffer.allocUnsafe(PAGE);
      for (let p = 0; p < BACKING_SIZE / PAGE; p++) {
        if (!this.backing.written(p)) {
          for (let i = 0; i < PAGE / SECTOR; i++) {
            const s = (p * PAGE) / SECTOR + i;
            if (model.view[s] !== 0) this.fail(`after drain the backing sector ${s} was never written, the cache holds ${model.describe(model.view[s]!)}`);
          }
          continue;
        }
        this.backing.peek(page, p * PAGE);
        for (let i = 0; i < PAGE / SECTOR; i++) check((p * PAGE) / SECTOR + i, page, i * SECTOR);
      }
      res.fullCompares++;
    } else {
      const sectors = new Set(model.chain.keys());
      for (let i = 0; i < 64; i++) sectors.add(rng.int(model.nSectors));
      const one = Buffer.allocUnsafe(SECTOR);
      for (const s of sectors) {
        this.backing.peek(one, s * SECTOR);
        check(s, one, 0);
      }
    }
    for (const s of model.chain.keys()) model.bk[s] = model.view[s]!;
    model.chain.clear();
  }

  /** The end of a lineage: drain, compare the whole backing device, close cleanly, check. */
  private async finish(): Promise<void> {
    await this.drainAndCompare(true);
    await withTimeout(this.cache.close(), 20_000, 'close');
    const report = await checkCache(new PageMedium(this.medium.image(), 'closed-cache'), { backingSize: BACKING_SIZE });
    if (!report.clean) this.fail(`checkCache after a clean close: ${report.problems.join('; ')}`);
    if (report.dirtyBytes !== 0) this.fail(`checkCache after drain and close: ${report.dirtyBytes} dirty bytes`);
  }
}

export function newResult(seed: number): CrashDriverResult {
  return {
    seed,
    crashPoints: 0,
    lineages: 0,
    ops: 0,
    writes: 0,
    bytesWritten: 0,
    flushes: 0,
    sectorsVerified: 0,
    drains: 0,
    fullCompares: 0,
    crashedAt: {},
    events: {},
    fallbacks: 0,
    tornLogEnds: 0,
    cleanRestarts: 0,
    formatCuts: 0,
    phaseMs: {},
    ms: 0,
  };
}

export async function runCrashDriver(opts: CrashDriverOptions): Promise<CrashDriverResult> {
  const log = opts.log ?? (() => undefined);
  const res = newResult(opts.seed);
  const start = Date.now();
  const stride = opts.stride ?? 1;
  const offset = opts.offset ?? 0;
  // Lineage lengths come from the seed alone, so that one lineage replays the same on its own.
  const lenRng = seededRng(opts.seed ^ 0x5eed);
  for (let i = 0; res.crashPoints < opts.crashPoints; i++) {
    const points = opts.lineageLength ?? 3 + lenRng.int(14);
    if (opts.onlyLineage !== undefined ? i !== opts.onlyLineage : i % stride !== offset) continue;
    if (opts.timeLimitMs !== undefined && Date.now() - start > opts.timeLimitMs) break;
    const lineage = new Lineage(opts.seed, i, res, log);
    await lineage.run(points);
    res.lineages++;
    log(`lineage ${i}: ${points} crash points done (${res.crashPoints} in all, ${Math.round((Date.now() - start) / 1000)} s)`);
    if (opts.onlyLineage !== undefined) break;
  }
  res.ms = Date.now() - start;
  return res;
}
