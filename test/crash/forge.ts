/**
 * Forged and damaged cache devices. Valid images are made by the engine itself (populated logs,
 * some spanning two log segments, caught in the middle of write-back or of GC, with and without
 * data_crc); each case then damages one at random or with knowledge of its structure (tails,
 * chains, key_num, key positions and lengths, LAST chains, generations, seq numbers), recomputing
 * CRCs so that forgeries pass checksum checks, and runs everything that reads a cache device:
 * checkCache, dumpCache, Cache.open (replay), reads, a write and flush, and a drain. Each must
 * work or fail with a named error (CacheError; check and dump report problems), never throw
 * anything else, never hang, and never read or write outside the cache or backing device.
 */
import { Cache } from '../../src/cache/cache.js';
import { checkCache } from '../../src/cache/check.js';
import { dumpCache, type CacheDump } from '../../src/cache/dump.js';
import { CacheError } from '../../src/cache/errors.js';
import {
  cacheInfoOffset,
  CACHE_CTRL_OFF,
  dataOffset,
  dirtyTailOffset,
  encodeGen,
  encodeKset,
  encodeLastKset,
  encodePosition,
  genOffset,
  KEY_FLAG_CLEAN,
  KEY_FLAG_EMPTY,
  KEY_SIZE,
  keyTailOffset,
  KSET_HEADER_SIZE,
  KSET_KEYS_MAX,
  pcacheCrc,
  SB_OFF,
  SEG_DATA_SIZE,
  segInfoOffset,
  segmentsFor,
  SUBTREE_SIZE,
  type Key,
} from '../../src/format/index.js';
import type { Medium } from '../../src/media/medium.js';
import { SparseCrashMedium } from '../../src/media/sparse-crash.js';
import { PageImage } from '../../src/media/sparse.js';
import { seededRng, type Rng } from '../helpers/rng.js';
import { BACKING_SIZE, CACHE_SIZE, CrashFailure, initialBackingImage, MiB } from './crash-driver.js';
import { PageBacking, SparseCrashBacking } from './devices.js';
import { SECTOR, tagData } from './tags.js';

const N_SEGS = segmentsFor(CACHE_SIZE);
const READ_LIMIT = 100_000;

export interface ForgeFuzzOptions {
  seed: number;
  cases: number;
  /** Run only this case (replaying a failure). */
  onlyCase?: number;
  log?: (line: string) => void;
}

export interface ForgeFuzzResult {
  seed: number;
  cases: number;
  bases: string[];
  /** Mutations applied, by name. */
  mutations: Record<string, number>;
  checkClean: number;
  checkProblems: number;
  opened: number;
  refused: number;
  /** Distinct refusal messages (numbers masked), with counts. */
  refusals: Record<string, number>;
  reads: number;
  readErrors: number;
  writes: number;
  writeErrors: number;
  drains: number;
  drainErrors: number;
  ms: number;
}

/** A cache medium over a PageImage that answers at once, counts reads and records any access outside the device. */
class WatchedMedium implements Medium {
  readonly violations: string[] = [];
  reads = 0;
  private ops = 0;

  constructor(
    readonly image: PageImage,
    readonly path = 'forged',
  ) {}

  size(): number {
    return this.image.size;
  }

  private async pace(op: string, offset: number, length: number): Promise<void> {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || offset + length > this.image.size) {
      this.violations.push(`${op} of ${length} bytes at ${offset}`);
      throw new RangeError(`${op} of ${length} bytes at ${offset} is outside the device`);
    }
    // Let timers run now and then, so that a reader that never stops is caught by a timeout.
    if (++this.ops % 256 === 0) await new Promise((r) => setImmediate(r));
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    if (++this.reads > READ_LIMIT) throw Object.assign(new Error(`read limit of ${READ_LIMIT} reads exceeded`), { code: 'ELIMIT' });
    await this.pace('read', offset, buf.length);
    this.image.read(buf, offset);
  }

  async write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    const bufs = Buffer.isBuffer(data) ? [data] : data;
    const len = bufs.reduce((n, b) => n + b.length, 0);
    await this.pace('write', offset, len);
    for (const b of bufs) {
      this.image.write(b, offset);
      offset += b.length;
    }
  }

  async sync(): Promise<void> {}
  async close(): Promise<void> {}
}

interface Base {
  name: string;
  image: PageImage;
  backing: PageImage;
  dump: CacheDump;
}

function pick<T>(rng: Rng, xs: readonly T[]): T {
  return xs[rng.int(xs.length)]!;
}

async function timeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new CrashFailure(`hang: ${what} did not finish within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

const until = async (cond: () => boolean, ms: number): Promise<void> => {
  const end = Date.now() + ms;
  while (!cond() && Date.now() < end) await new Promise((r) => setTimeout(r, 1));
};

/**
 * A valid image made by the engine: a random workload, caught at a random moment, optionally in
 * the middle of write-back (backing writes held) or of GC (key_tail update held), optionally with
 * the log crossing into a second segment.
 */
async function makeBase(rng: Rng, variant: { dataCrc: boolean; aged: boolean; moment: 'plain' | 'mid-writeback' | 'mid-gc' }): Promise<Base> {
  let start = new PageImage(CACHE_SIZE);
  const gcPercent = variant.moment === 'mid-gc' ? 0 : variant.moment === 'plain' ? 70 : 10;
  if (variant.aged) {
    // Format, then put the log's start near the end of segment 3, so the log goes on in another.
    const m = new SparseCrashMedium(start);
    const c = await Cache.open(m, new PageBacking(initialBackingImage()), { dataCrc: variant.dataCrc, gcPercent });
    await c.close();
    start = m.image();
    const off = SEG_DATA_SIZE - KSET_HEADER_SIZE - 8 * rng.int(400);
    start.write(Buffer.alloc(KSET_HEADER_SIZE), dataOffset(3, off));
    start.write(encodePosition({ seq: 2, seg: 3, off }), keyTailOffset(1));
    start.write(encodePosition({ seq: 2, seg: 3, off }), dirtyTailOffset(1));
  }
  const medium = new SparseCrashMedium(start);
  const backing = new SparseCrashBacking(initialBackingImage());
  const cache = await Cache.open(medium, backing, { dataCrc: variant.dataCrc, gcPercent, writebackIntervalMs: 1, ksetCloseMs: 1 });
  let id = 1;
  const ops = 40 + rng.int(80);
  let held: { release(): void } | null = null;
  for (let i = 0; i < ops; i++) {
    if (i === ops >> 1 && variant.moment === 'mid-writeback') held = backing.hold(() => true, ['write']);
    if (i === ops >> 1 && variant.moment === 'mid-gc') held = medium.hold((off) => off >= CACHE_CTRL_OFF && off < CACHE_CTRL_OFF + 32, ['write']);
    const len = (1 + rng.int(rng.next() < 0.1 ? 256 : 16)) * SECTOR;
    const off = Math.min(8 * MiB - len, rng.int((8 * MiB) / SECTOR) * SECTOR);
    const r = rng.next();
    if (r < 0.6) await cache.write(off, tagData(off, len, id++), { fua: rng.next() < 0.1 });
    else if (r < 0.7) await cache.writeZeroes(off, len);
    else if (r < 0.8) await cache.flush();
    else await cache.read(off, len);
    if (rng.next() < 0.2) await new Promise((r2) => setTimeout(r2, 1));
  }
  await cache.flush();
  await until(() => held === null && cache.status().dirtyBytes === 0, 20);
  const image = rng.next() < 0.5 ? medium.image() : medium.crash(rng.next, { keep: 0.5 });
  const bimg = backing.image();
  medium.kill();
  backing.kill();
  held?.release();
  await cache.abandon();
  const dump = await dumpCache(new WatchedMedium(image.clone()));
  const name = `${variant.moment}${variant.aged ? ', log in two segments' : ''}${variant.dataCrc ? ', data_crc' : ''}: ${dump.summary.ksets} ksets, ${dump.summary.keys} keys, ${dump.summary.dirtyKeys} dirty`;
  return { name, image, backing: bimg, dump };
}

function u32(img: PageImage, off: number, v: number): void {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0);
  img.write(b, off);
}

function u64(img: PageImage, off: number, v: bigint): void {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt.asUintN(64, v));
  img.write(b, off);
}

function resealMeta(img: PageImage, off: number, size: number): void {
  const body = img.slice(off + 4, size - 4);
  u32(img, off, pcacheCrc(body));
}

/** Reseal the kset at `off` over what its header claims, when that stays inside the image. */
function resealKset(img: PageImage, off: number): void {
  const head = img.slice(off, KSET_HEADER_SIZE);
  const last = (head.readBigUInt64LE(16) & 1n) !== 0n;
  const keyNum = head.readUInt32LE(4);
  const len = last ? KSET_HEADER_SIZE : KSET_HEADER_SIZE + KEY_SIZE * Math.min(keyNum, KSET_KEYS_MAX + 64);
  if (off + len > img.size) return;
  u32(img, off, pcacheCrc(img.slice(off + 4, len - 4)));
}

/** Write a two-slot record so that it wins: seq one past the newest valid one (or a chosen seq). */
function winningSeq(img: PageImage, offsets: [number, number], rng: Rng): { slot: number; seq: number } {
  const seqs = offsets.map((o) => img.slice(o + 4, 1)[0]!);
  const slot = rng.int(2);
  const seq = rng.next() < 0.85 ? (Math.max(...seqs) + 1) & 0xff : rng.int(256);
  return { slot, seq };
}

const INTERESTING_U32 = [0, 1, 7, 8, 24, 511, 512, 4095, 4096, 0x7fffffff, 0x80000000, 0xffffffff, SEG_DATA_SIZE - 1, SEG_DATA_SIZE, SEG_DATA_SIZE - 24];

function interesting(rng: Rng, extra: readonly number[] = []): number {
  const xs = [...INTERESTING_U32, ...extra];
  return rng.next() < 0.7 ? pick(rng, xs) : rng.int(2 ** 32);
}

type Mutation = (img: PageImage, base: Base, rng: Rng) => string;

function ksetsOf(base: Base): Array<{ pos: { seg: number; off: number }; deviceOffset: number; size: number; last: boolean; keyNum: number }> {
  return (base.dump.log?.ksets ?? []).map((k) => ({ pos: k.pos, deviceOffset: k.deviceOffset, size: k.size, last: k.last, keyNum: k.last ? 0 : k.keyNum }));
}

function randomPosition(rng: Rng, base: Base): { seg: number; off: number } {
  const ks = ksetsOf(base);
  const end = base.dump.log?.end ?? { seg: 0, off: 0 };
  const r = rng.next();
  if (r < 0.3 && ks.length) return pick(rng, ks).pos;
  if (r < 0.45 && ks.length) {
    const p = pick(rng, ks).pos;
    return { seg: p.seg, off: Math.max(0, p.off + pick(rng, [-40, -24, -8, 8, 24, 40])) };
  }
  if (r < 0.55) return end;
  if (r < 0.65) return { seg: end.seg, off: end.off + pick(rng, [24, 64, 4096]) };
  if (r < 0.75) return { seg: rng.int(N_SEGS), off: pick(rng, [0, SEG_DATA_SIZE - 24, SEG_DATA_SIZE - 8, SEG_DATA_SIZE - 64]) };
  if (r < 0.85) return { seg: pick(rng, [N_SEGS, N_SEGS + 1, 0xffffffff]), off: 0 };
  if (r < 0.9) return { seg: 0, off: pick(rng, [SEG_DATA_SIZE, SEG_DATA_SIZE + 8, 0xffffffff]) };
  return { seg: rng.int(N_SEGS), off: rng.int(SEG_DATA_SIZE / 8) * 8 };
}

function forgedKey(rng: Rng, base: Base, like?: Key): Key {
  const k: Key = like
    ? { ...like }
    : { off: rng.int(BACKING_SIZE / SECTOR) * SECTOR, len: 4096, flags: 0, seg: rng.int(N_SEGS), segOff: rng.int(1024) * 4096, gen: base.dump.segments[0]?.gen ?? 0, dataCrc: 0 };
  const field = rng.int(8);
  switch (field) {
    case 0:
      k.off = pick(rng, [0, BACKING_SIZE - k.len, BACKING_SIZE, BACKING_SIZE - 512, SUBTREE_SIZE - 512, 2 ** 53, Number.MAX_SAFE_INTEGER, rng.int(BACKING_SIZE)]);
      break;
    case 1:
      k.len = pick(rng, [0, 1, 512, 4096, SUBTREE_SIZE, SUBTREE_SIZE + 512, SEG_DATA_SIZE, SEG_DATA_SIZE + 1, 0xffffffff, rng.int(2 ** 32)]);
      break;
    case 2:
      k.flags = pick(rng, [KEY_FLAG_EMPTY, KEY_FLAG_CLEAN, 0, 4, KEY_FLAG_CLEAN | 8, 0xffffffff]);
      break;
    case 3:
      k.seg = interesting(rng, [N_SEGS - 1, N_SEGS, N_SEGS + 1]);
      break;
    case 4:
      k.segOff = interesting(rng);
      break;
    case 5:
      k.gen = pick(rng, [0, k.gen + 1, Math.max(0, k.gen - 1), 2 ** 53, Number.MAX_SAFE_INTEGER, 1000]);
      break;
    case 6:
      k.dataCrc = rng.int(2 ** 32);
      break;
    default:
      // Several at once, all plausible-looking.
      k.off = rng.int(BACKING_SIZE / SECTOR) * SECTOR;
      k.len = Math.min(BACKING_SIZE - k.off, (1 + rng.int(64)) * SECTOR);
      k.seg = rng.int(N_SEGS);
      k.segOff = rng.int(SEG_DATA_SIZE / SECTOR) * SECTOR;
  }
  return k;
}

function encodeKeyAt(img: PageImage, off: number, k: Key): void {
  const b = Buffer.alloc(KEY_SIZE);
  b.writeBigUInt64LE(BigInt.asUintN(64, BigInt(Math.min(k.off, 2 ** 64 - 1))), 0);
  b.writeUInt32LE(k.len >>> 0, 8);
  b.writeUInt32LE(k.flags >>> 0, 12);
  b.writeUInt32LE(k.seg >>> 0, 16);
  b.writeUInt32LE(k.segOff >>> 0, 20);
  b.writeBigUInt64LE(BigInt.asUintN(64, BigInt(k.gen)), 24);
  b.writeUInt32LE(k.dataCrc >>> 0, 32);
  img.write(b, off);
}

function decodeKeyAt(img: PageImage, off: number): Key {
  const b = img.slice(off, KEY_SIZE);
  return {
    off: Number(b.readBigUInt64LE(0)),
    len: b.readUInt32LE(8),
    flags: b.readUInt32LE(12),
    seg: b.readUInt32LE(16),
    segOff: b.readUInt32LE(20),
    gen: Number(b.readBigUInt64LE(24)),
    dataCrc: b.readUInt32LE(32),
  };
}

function metaRegions(base: Base): Array<{ what: string; off: number; size: number }> {
  const out = [{ what: 'superblock', off: SB_OFF, size: 24 }];
  for (const s of [0, 1]) out.push({ what: `cache_info ${s}`, off: cacheInfoOffset(s), size: 24 });
  for (let i = 0; i < 4; i++) out.push({ what: `cache_ctrl ${i}`, off: CACHE_CTRL_OFF + 16 * i, size: 16 });
  for (const seg of base.dump.segments.slice(0, 8)) {
    for (const s of [0, 1]) {
      out.push({ what: `segment_info ${seg.phys}/${s}`, off: segInfoOffset(seg.phys, s), size: 16 });
      out.push({ what: `generation ${seg.phys}/${s}`, off: genOffset(seg.phys, s), size: 16 });
    }
  }
  return out;
}

const MUTATIONS: Record<string, Mutation> = {
  'flip metadata': (img, base, rng) => {
    const r = pick(rng, metaRegions(base));
    const n = 1 + rng.int(3);
    for (let i = 0; i < n; i++) {
      const at = r.off + rng.int(r.size);
      img.write(Buffer.from([img.slice(at, 1)[0]! ^ (1 + rng.int(255))]), at);
    }
    if (rng.next() < 0.6) resealMeta(img, r.off, r.size);
    return r.what;
  },
  'flip kset': (img, base, rng) => {
    const ks = ksetsOf(base);
    if (!ks.length) return 'no kset';
    const k = pick(rng, ks);
    const n = 1 + rng.int(3);
    for (let i = 0; i < n; i++) {
      const at = k.deviceOffset + rng.int(k.size);
      img.write(Buffer.from([img.slice(at, 1)[0]! ^ (1 + rng.int(255))]), at);
    }
    if (rng.next() < 0.7) resealKset(img, k.deviceOffset);
    return `kset at ${k.pos.seg}:${k.pos.off}`;
  },
  tail: (img, base, rng) => {
    const which = rng.next() < 0.5 ? 'key_tail' : 'dirty_tail';
    const offs: [number, number] = which === 'key_tail' ? [keyTailOffset(0), keyTailOffset(1)] : [dirtyTailOffset(0), dirtyTailOffset(1)];
    const { slot, seq } = winningSeq(img, offs, rng);
    const p = randomPosition(rng, base);
    img.write(encodePosition({ seq, seg: p.seg, off: p.off }), offs[slot]!);
    return `${which} = ${p.seg}:${p.off}`;
  },
  'key_num': (img, base, rng) => {
    const ks = ksetsOf(base).filter((k) => !k.last);
    if (!ks.length) return 'no kset';
    const k = pick(rng, ks);
    const n = pick(rng, [0, 1, Math.max(0, k.keyNum - 1), k.keyNum + 1, KSET_KEYS_MAX, KSET_KEYS_MAX + 1, 0xffffffff, rng.int(300)]);
    u32(img, k.deviceOffset + 4, n);
    if (rng.next() < 0.8) resealKset(img, k.deviceOffset);
    return `kset at ${k.pos.seg}:${k.pos.off} key_num ${n}`;
  },
  key: (img, base, rng) => {
    const ks = ksetsOf(base).filter((k) => !k.last && k.keyNum > 0);
    if (!ks.length) return 'no kset';
    const k = pick(rng, ks);
    const i = rng.int(k.keyNum);
    const at = k.deviceOffset + KSET_HEADER_SIZE + i * KEY_SIZE;
    encodeKeyAt(img, at, forgedKey(rng, base, decodeKeyAt(img, at)));
    if (rng.next() < 0.9) resealKset(img, k.deviceOffset);
    return `kset at ${k.pos.seg}:${k.pos.off} key ${i}`;
  },
  'LAST kset': (img, base, rng) => {
    const ks = ksetsOf(base);
    const last = ks.filter((k) => k.last);
    const end = base.dump.log?.end;
    const next = interesting(rng, [N_SEGS - 1, N_SEGS, ...ks.map((k) => k.pos.seg), ...(end ? [end.seg] : [])]);
    if (last.length && rng.next() < 0.6) {
      const k = pick(rng, last);
      u32(img, k.deviceOffset + 4, next);
      if (rng.next() < 0.9) resealKset(img, k.deviceOffset);
      return `LAST at ${k.pos.seg}:${k.pos.off} -> ${next}`;
    }
    // Plant one at the end of the log (or in the middle of it).
    const where = end && rng.next() < 0.7 ? end : pick(rng, ks.length ? ks.map((k) => k.pos) : [{ seg: 0, off: 0 }]);
    img.write(encodeLastKset(next), dataOffset(base.dump.segments[where.seg]?.phys ?? where.seg, where.off));
    return `planted LAST at ${where.seg}:${where.off} -> ${next}`;
  },
  'planted kset': (img, base, rng) => {
    const end = base.dump.log?.end ?? { seg: 0, off: 0 };
    const keys: Key[] = [];
    const n = 1 + rng.int(5);
    for (let i = 0; i < n; i++) {
      // Plausible keys (a valid one, tweaked) and wild ones.
      const plausible: Key = { off: rng.int(BACKING_SIZE / SECTOR / 8) * SECTOR, len: (1 + rng.int(16)) * SECTOR, flags: 0, seg: rng.int(N_SEGS), segOff: rng.int(4096) * SECTOR, gen: 0, dataCrc: 0 };
      keys.push(rng.next() < 0.5 ? plausible : forgedKey(rng, base, plausible));
    }
    const buf = encodeKset(keys, KSET_HEADER_SIZE);
    const phys = base.dump.segments[end.seg]?.phys ?? end.seg;
    if (end.off + buf.length > SEG_DATA_SIZE) return 'no room';
    img.write(buf, dataOffset(phys, end.off));
    if (rng.next() < 0.3) {
      // ... and a LAST kset after it, leading anywhere.
      img.write(encodeLastKset(interesting(rng, [N_SEGS - 1, end.seg])), dataOffset(phys, end.off + buf.length - KSET_HEADER_SIZE));
    }
    return `${n} keys at ${end.seg}:${end.off}`;
  },
  generation: (img, base, rng) => {
    const seg = pick(rng, base.dump.segments);
    const offs: [number, number] = [genOffset(seg.phys, 0), genOffset(seg.phys, 1)];
    const { slot, seq } = winningSeq(img, offs, rng);
    const gen = pick(rng, [0, seg.gen + 1, Math.max(0, seg.gen - 1), seg.gen + 1000, 2 ** 53, Number.MAX_SAFE_INTEGER]);
    if (gen > Number.MAX_SAFE_INTEGER || rng.next() < 0.1) {
      const b = encodeGen({ seq, gen: 0 });
      b.writeBigUInt64LE(0xffffffffffffffffn, 8);
      img.write(b, offs[slot]!);
      resealMeta(img, offs[slot]!, 16);
      return `gen of ${seg.phys} = 2^64-1`;
    }
    img.write(encodeGen({ seq, gen }), offs[slot]!);
    return `gen of ${seg.phys} = ${gen}`;
  },
  'seq rollback': (img, base, rng) => {
    const r = pick(rng, metaRegions(base).filter((x) => x.what !== 'superblock'));
    // Make this slot the newest by seq, whatever it holds.
    img.write(Buffer.from([(img.slice(r.off + 4, 1)[0]! + pick(rng, [1, 2, 127, 128, 255])) & 0xff]), r.off + 4);
    resealMeta(img, r.off, r.size);
    return `${r.what} seq`;
  },
  chain: (img, base, rng) => {
    const seg = pick(rng, base.dump.segments);
    const slot = rng.int(2);
    const at = segInfoOffset(seg.phys, slot);
    if (rng.next() < 0.5) u32(img, at + 12, interesting(rng, [seg.phys, 0, N_SEGS - 1, N_SEGS]));
    else u32(img, at + 8, pick(rng, [0, 1, 2, 3, 0xffffffff]));
    img.write(Buffer.from([(img.slice(at + 4, 1)[0]! + 3) & 0xff]), at + 4);
    resealMeta(img, at, 16);
    return `segment_info ${seg.phys}/${slot}`;
  },
  superblock: (img, _base, rng) => {
    const r = rng.int(4);
    if (r === 0) u32(img, SB_OFF + 16, interesting(rng, [N_SEGS, N_SEGS + 1, 1 << 20, (1 << 20) + 1]));
    else if (r === 1) u32(img, SB_OFF + 4, pick(rng, [1, 2, 0x80000000]));
    else if (r === 2) u64(img, SB_OFF + 8, 0n);
    else u64(img, SB_OFF + 8, BigInt(rng.int(2 ** 32)));
    if (rng.next() < 0.8) resealMeta(img, SB_OFF, 24);
    return `superblock field ${r}`;
  },
  'cache_info': (img, _base, rng) => {
    const offs: [number, number] = [cacheInfoOffset(0), cacheInfoOffset(1)];
    const { slot, seq } = winningSeq(img, offs, rng);
    const cur = img.slice(offs[0]!, 24);
    const b = Buffer.alloc(24);
    cur.copy(b);
    const field = rng.int(4);
    if (field === 0) b.writeUInt32LE(interesting(rng, [N_SEGS - 1, N_SEGS]), 8);
    else if (field === 1) b.writeUInt32LE(interesting(rng, [1, 2, N_SEGS - 1, N_SEGS, N_SEGS + 1]), 12);
    else if (field === 2) b.writeUInt32LE((b.readUInt32LE(16) ^ (1 << rng.int(13))) >>> 0, 16);
    else b.writeUInt32LE(rng.int(2 ** 32), 16);
    b[4] = seq;
    b.writeUInt32LE(pcacheCrc(b.subarray(4)), 0);
    img.write(b, offs[slot]!);
    return `cache_info field ${field}`;
  },
  'key data': (img, base, rng) => {
    const keys = (base.dump.log?.ksets ?? []).flatMap((k) => (k.last ? [] : k.keys));
    if (!keys.length) return 'no key';
    const k = pick(rng, keys);
    const phys = base.dump.segments[k.seg]?.phys ?? 0;
    const at = dataOffset(phys, k.segOff) + rng.int(k.len);
    img.write(Buffer.from([img.slice(at, 1)[0]! ^ 0xff]), at);
    return `data of key ${k.off}+${k.len}`;
  },
  'zeroed sector': (img, base, rng) => {
    const ks = ksetsOf(base);
    const off = ks.length && rng.next() < 0.7 ? pick(rng, ks).deviceOffset : pick(rng, metaRegions(base)).off;
    const at = Math.floor(off / SECTOR) * SECTOR;
    img.write(Buffer.alloc(SECTOR), at);
    return `sector at ${at}`;
  },
  'random bytes': (img, base, rng) => {
    const ks = ksetsOf(base);
    const off = ks.length && rng.next() < 0.5 ? pick(rng, ks).deviceOffset : rng.int(img.size - 64);
    img.write(rng.bytes(1 + rng.int(64)), Math.min(img.size - 64, off + rng.int(256)));
    return `at ${off}`;
  },
};

const MUTATION_NAMES = Object.keys(MUTATIONS);

function mask(msg: string): string {
  return msg.replace(/0x[0-9a-f]+|\b[0-9a-f]*\d[0-9a-f]*\b/g, 'N').slice(0, 90);
}

function caseSeed(seed: number, i: number): number {
  let x = (seed ^ Math.imul(i + 0x1234567, 0x9e3779b9)) >>> 0;
  x = Math.imul(x ^ (x >>> 16), 0x85ebca6b) >>> 0;
  return (x ^ (x >>> 13)) >>> 0;
}

export async function runForgeFuzz(opts: ForgeFuzzOptions): Promise<ForgeFuzzResult> {
  const start = Date.now();
  const log = opts.log ?? (() => undefined);
  const rng = seededRng(opts.seed);
  const bases: Base[] = [];
  const variants = [
    { dataCrc: false, aged: false, moment: 'mid-writeback' },
    { dataCrc: true, aged: false, moment: 'mid-gc' },
    { dataCrc: false, aged: true, moment: 'mid-gc' },
    { dataCrc: true, aged: true, moment: 'mid-writeback' },
    { dataCrc: false, aged: false, moment: 'plain' },
    { dataCrc: false, aged: true, moment: 'plain' },
  ] as const;
  for (const v of variants) {
    const b = await makeBase(rng, v);
    // The undamaged image is clean and opens.
    const report = await checkCache(new WatchedMedium(b.image.clone()), { backingSize: BACKING_SIZE });
    if (!report.clean) throw new CrashFailure(`seed ${opts.seed}: base image (${b.name}) is not clean: ${report.problems.join('; ')}`);
    const c = await Cache.open(new WatchedMedium(b.image.clone()), new PageBacking(b.backing.clone()), { writebackIntervalMs: 60_000 });
    await c.abandon();
    bases.push(b);
    log(`base: ${b.name}`);
  }
  const res: ForgeFuzzResult = {
    seed: opts.seed,
    cases: 0,
    bases: bases.map((b) => b.name),
    mutations: {},
    checkClean: 0,
    checkProblems: 0,
    opened: 0,
    refused: 0,
    refusals: {},
    reads: 0,
    readErrors: 0,
    writes: 0,
    writeErrors: 0,
    drains: 0,
    drainErrors: 0,
    ms: 0,
  };
  for (let i = 0; i < opts.cases; i++) {
    if (opts.onlyCase !== undefined && i !== opts.onlyCase) continue;
    const crng = seededRng(caseSeed(opts.seed, i));
    const base = pick(crng, bases);
    const img = base.image.clone();
    const applied: string[] = [];
    const n = crng.next() < 0.25 ? 2 + crng.int(2) : 1;
    for (let j = 0; j < n; j++) {
      const name = pick(crng, MUTATION_NAMES);
      res.mutations[name] = (res.mutations[name] ?? 0) + 1;
      applied.push(`${name}: ${MUTATIONS[name]!(img, base, crng)}`);
    }
    const where = `forge seed ${opts.seed} case ${i} (base ${base.name}; ${applied.join('; ')})\n  replay: PCACHE_FORGE_SEED=${opts.seed} PCACHE_FORGE_CASE=${i}`;
    try {
      await runCase(img, base, crng, res);
    } catch (err) {
      const msg = err instanceof Error ? (err instanceof CrashFailure ? err.message : (err.stack ?? err.message)) : String(err);
      throw new CrashFailure(`${msg}\n  at ${where}`);
    }
    res.cases++;
  }
  res.ms = Date.now() - start;
  return res;
}

function named(err: unknown, what: string): void {
  if (err instanceof CacheError) return;
  throw new CrashFailure(`${what} threw ${err instanceof Error ? `${err.name}: ${err.stack ?? err.message}` : String(err)}, not a CacheError`);
}

async function runCase(img: PageImage, base: Base, rng: Rng, res: ForgeFuzzResult): Promise<void> {
  // Check and dump only read.
  const ro = new WatchedMedium(img);
  const report = await timeout(checkCache(ro, { backingSize: BACKING_SIZE }), 10_000, 'checkCache');
  const stopped = report.problems.find((p) => p.startsWith('check stopped'));
  if (stopped) throw new CrashFailure(`checkCache: an exception escaped: ${stopped}`);
  if (report.clean) res.checkClean++;
  else res.checkProblems++;
  const dump = await timeout(dumpCache(ro), 10_000, 'dumpCache');
  const dstopped = dump.errors.find((e) => e.startsWith('dump stopped'));
  if (dstopped) throw new CrashFailure(`dumpCache: an exception escaped: ${dstopped}`);
  if (ro.violations.length) throw new CrashFailure(`check or dump accessed outside the device: ${ro.violations.join('; ')}`);

  const medium = new WatchedMedium(img);
  const backing = new PageBacking(base.backing.clone());
  let cache: Cache;
  try {
    const opts = rng.next() < 0.1 ? { dataCrc: rng.next() < 0.5 } : {};
    cache = await timeout(Cache.open(medium, backing, { ...opts, writebackIntervalMs: 60_000, ksetCloseMs: 60_000 }), 10_000, 'Cache.open');
  } catch (err) {
    if (err instanceof CrashFailure) throw err;
    named(err, 'Cache.open');
    res.refused++;
    const k = mask((err as Error).message);
    res.refusals[k] = (res.refusals[k] ?? 0) + 1;
    if (medium.violations.length) throw new CrashFailure(`opening accessed outside the device: ${medium.violations.join('; ')}`);
    return;
  }
  res.opened++;
  try {
    cache.status();
    // Reads over the keys the (damaged) log holds, and anywhere.
    const ranges: Array<{ off: number; len: number }> = [];
    for (const k of (dump.log?.ksets ?? []).flatMap((x) => (x.last ? [] : x.keys)).slice(0, 6)) {
      if (k.off + k.len <= BACKING_SIZE && k.len <= 4 * MiB) ranges.push({ off: k.off, len: k.len });
    }
    for (let i = 0; i < 2; i++) {
      const len = (1 + rng.int(64)) * SECTOR;
      ranges.push({ off: rng.int((BACKING_SIZE - len) / SECTOR) * SECTOR, len });
    }
    for (const r of ranges) {
      res.reads++;
      try {
        await timeout(cache.read(r.off, r.len), 10_000, `read ${r.off}+${r.len}`);
      } catch (err) {
        if (err instanceof CrashFailure) throw err;
        named(err, `read ${r.off}+${r.len}`);
        res.readErrors++;
      }
    }
    if (rng.next() < 0.3) {
      res.writes++;
      try {
        const off = rng.int(BACKING_SIZE / SECTOR - 16) * SECTOR;
        await timeout(cache.write(off, tagData(off, 8 * SECTOR, 1)), 10_000, 'write');
        await timeout(cache.flush(), 10_000, 'flush');
      } catch (err) {
        if (err instanceof CrashFailure) throw err;
        named(err, 'write and flush');
        res.writeErrors++;
      }
    }
    if (rng.next() < 0.15) {
      res.drains++;
      try {
        await timeout(cache.drain({ maxErrors: 0 }), 10_000, 'drain');
      } catch (err) {
        if (err instanceof CrashFailure) throw err;
        named(err, 'drain');
        res.drainErrors++;
      }
    }
  } finally {
    await timeout(cache.abandon(), 10_000, 'abandon');
  }
  if (medium.violations.length) throw new CrashFailure(`the engine accessed outside the cache device: ${medium.violations.join('; ')}`);
  if (backing.violations.length) throw new CrashFailure(`the engine accessed outside the backing device: ${backing.violations.join('; ')}`);
  if (medium.reads > READ_LIMIT) throw new CrashFailure(`the engine did not stop reading (${medium.reads} reads)`);
}
