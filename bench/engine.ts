/**
 * In-process benchmarks of the cache engine (no NBD), on sparse files in the temp directory:
 * - 4 KiB random writes, read hits and read misses per second, at queue depth 1 and 32;
 * - write-back throughput (MiB/s) from a file cache device to a file backing device;
 * - replay time (Cache.open) of a cache holding 1 million 4 KiB keys (target < 2 s);
 * - memory per cached key after that replay, JS heap and array buffers (target < 100 bytes).
 *
 * Run: node --import tsx bench/engine.ts [--keys N] [--ops N] [--only io|replay] [--replay-runs N]
 * Prints a markdown table (for BENCHMARKS.md) on stdout, progress on stderr.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { availableParallelism, cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import type { BackingDevice } from '../src/backing/backing.js';
import { openFileBacking } from '../src/backing/file.js';
import { Cache } from '../src/cache/cache.js';
import { openFileMedium } from '../src/media/file.js';

setFlagsFromString('--expose_gc');
const gc = runInNewContext('gc') as () => void;

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const BLOCK = 4 * KiB;

function arg(name: string, dflt: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : dflt;
}
const KEYS = arg('keys', 1_000_000);
const OPS = arg('ops', 50_000);
const REPLAY_RUNS = arg('replay-runs', 3);
const ONLY = ((): string | null => {
  const i = process.argv.indexOf('--only');
  return i >= 0 ? process.argv[i + 1] ?? null : null;
})();

const log = (s: string): void => void process.stderr.write(`bench: ${s}\n`);
const rows: Array<[string, string, string]> = [];
const row = (what: string, value: string, note = ''): void => {
  rows.push([what, value, note]);
  log(`${what}: ${value} ${note}`);
};

/** A backing device that drops writes and reads zeros, and can park its writes (to time a drain). */
class NullBacking implements BackingDevice {
  readonly name = 'null';
  private gate: Promise<void> | null = null;
  private open: (() => void) | null = null;
  constructor(private readonly bytes: number) {}
  size(): number {
    return this.bytes;
  }
  async read(buf: Buffer): Promise<void> {
    buf.fill(0);
  }
  async write(): Promise<void> {
    await this.gate;
  }
  async flush(): Promise<void> {}
  async close(): Promise<void> {}
  hold(): void {
    this.gate = new Promise((r) => (this.open = r));
  }
  release(): void {
    this.open?.();
    this.gate = null;
  }
}

/** Parks backing writes until release(), so the data to write back piles up first. */
class Paused implements BackingDevice {
  private gate: Promise<void> | null = null;
  private open: (() => void) | null = null;
  constructor(private readonly inner: BackingDevice) {}
  get name(): string {
    return this.inner.name;
  }
  size(): number {
    return this.inner.size();
  }
  read(buf: Buffer, off: number): Promise<void> {
    return this.inner.read(buf, off);
  }
  async write(data: Buffer, off: number): Promise<void> {
    await this.gate;
    return this.inner.write(data, off);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
  hold(): void {
    this.gate = new Promise((r) => (this.open = r));
  }
  release(): void {
    this.open?.();
    this.gate = null;
  }
}

/** Run `n` operations with `depth` in flight; ops per second. */
async function rate(n: number, depth: number, op: (i: number) => Promise<unknown>): Promise<number> {
  let next = 0;
  const t0 = process.hrtime.bigint();
  const worker = async (): Promise<void> => {
    while (next < n) await op(next++);
  };
  await Promise.all(Array.from({ length: depth }, worker));
  return n / (Number(process.hrtime.bigint() - t0) / 1e9);
}

function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const fmt = (n: number): string => Math.round(n).toLocaleString('en-US');

async function randomIo(dir: string): Promise<void> {
  const medium = await openFileMedium(join(dir, 'io-cache.img'), { create: true, sizeIfCreate: 2 * GiB });
  const fileBacking = await openFileBacking(join(dir, 'io-backing.img'), { create: true, size: 8 * GiB });
  const backing = new Paused(fileBacking);
  const cache = await Cache.open(medium, backing, { gcPercent: 90 });
  const r = rng(1);
  const region = GiB / BLOCK; // writes and hits within the first GiB, misses beyond it
  const data = Buffer.alloc(BLOCK, 0x5a);
  const written: number[] = [];

  // Writes pile up in the cache while write-back is parked, then the drain is timed.
  backing.hold();
  for (const depth of [1, 32]) {
    const n = depth === 1 ? Math.min(OPS, 20_000) : OPS;
    const w = await rate(n, depth, () => {
      const b = Math.floor(r() * region);
      written.push(b);
      return cache.write(b * BLOCK, data);
    });
    row(`4 KiB random writes, QD${depth}`, `${fmt(w)} /s`, `${fmt((w * BLOCK) / MiB)} MiB/s`);
  }
  for (const depth of [1, 32]) {
    const n = depth === 1 ? Math.min(OPS, 20_000) : OPS;
    const h = await rate(n, depth, () => cache.read(written[Math.floor(r() * written.length)]! * BLOCK, BLOCK));
    row(`4 KiB random read hits, QD${depth}`, `${fmt(h)} /s`);
  }
  for (const depth of [1, 32]) {
    const n = depth === 1 ? Math.min(OPS, 20_000) : OPS;
    const m = await rate(n, depth, () => cache.read((region + Math.floor(r() * 6 * region)) * BLOCK, BLOCK));
    row(`4 KiB random read misses, QD${depth}`, `${fmt(m)} /s`, 'backing: sparse file; each miss is filled into the cache');
  }

  // Write-back, timed from the release of the parked backing device to a clean cache: first the
  // random 4 KiB writes above, then 256 MiB of sequential 1 MiB writes.
  const drainTimed = async (what: string): Promise<void> => {
    const before = cache.status().counters;
    const t0 = process.hrtime.bigint();
    backing.release();
    await cache.drain();
    const secs = Number(process.hrtime.bigint() - t0) / 1e9;
    const after = cache.status().counters;
    const bytes = after.writtenBackBytes - before.writtenBackBytes;
    const ksets = after.writtenBackKsets - before.writtenBackKsets;
    row(`write-back, ${what}`, `${(bytes / MiB / secs).toFixed(0)} MiB/s`, `${fmt(bytes / MiB)} MiB in ${fmt(ksets)} ksets, ${fmt(ksets / secs)} ksets/s; file to file, a backing flush per kset`);
  };
  await drainTimed('random 4 KiB keys');
  backing.hold();
  for (let i = 0; i < 256; i++) await cache.write(2 * GiB + i * MiB, Buffer.alloc(MiB, i & 0xff));
  await drainTimed('sequential 1 MiB keys');
  await cache.close();
  await medium.close();
  await backing.close();
}

/** Write KEYS 4 KiB keys into a fresh cache and close it, leaving them all dirty (none written back). */
async function buildReplayCache(dir: string): Promise<{ cachePath: string; backing: NullBacking }> {
  // 1M keys of 4 KiB = 4 GiB of cached data: a 7 GiB cache keeps GC (gc_percent 90) out of the way.
  const cachePath = join(dir, 'replay-cache.img');
  const backingSize = Math.max(8 * GiB, 2 * KEYS * BLOCK);
  const cacheSize = Math.ceil((KEYS * BLOCK * 1.5) / GiB) * GiB + GiB;
  const medium = await openFileMedium(cachePath, { create: true, sizeIfCreate: cacheSize });
  const backing = new NullBacking(backingSize);
  backing.hold(); // write-back makes no progress: replay has every key to index
  const cache = await Cache.open(medium, backing, { gcPercent: 90 });
  const data = Buffer.alloc(BLOCK, 0xa5);
  log(`writing ${fmt(KEYS)} 4 KiB keys (${fmt((KEYS * BLOCK) / MiB)} MiB) into a ${cacheSize / GiB} GiB cache`);
  const t0 = Date.now();
  // Every other block, so no two keys touch and none replaces another.
  await rate(KEYS, 32, (i) => cache.write(i * 2 * BLOCK, data));
  log(`written in ${((Date.now() - t0) / 1000).toFixed(1)} s; index keys ${fmt(cache.status().indexKeys)}`);
  backing.release();
  await cache.close();
  await medium.close();
  return { cachePath, backing };
}

function heldBytes(): number {
  const m = process.memoryUsage();
  return m.heapUsed + m.arrayBuffers;
}

async function replay(dir: string): Promise<void> {
  const { cachePath, backing } = await buildReplayCache(dir);
  // The best of a few runs: wall time on a shared 2-core machine is mostly other processes' noise.
  let best: { wallMs: number; cpuMs: number; keys: number } | null = null;
  for (let run = 0; run < REPLAY_RUNS; run++) {
    const medium = await openFileMedium(cachePath);
    gc();
    gc();
    // Typed arrays live outside the JS heap: count them too (heapUsed alone would not see the index).
    const heap0 = heldBytes();
    const rss0 = process.memoryUsage().rss;
    const cpu0 = process.cpuUsage();
    const t1 = process.hrtime.bigint();
    const cache = await Cache.open(medium, backing);
    const wallMs = Number(process.hrtime.bigint() - t1) / 1e6;
    const cpu = process.cpuUsage(cpu0);
    const cpuMs = (cpu.user + cpu.system) / 1000;
    const keys = cache.status().indexKeys;
    log(`replay run ${run + 1}: ${fmt(keys)} keys in ${(wallMs / 1000).toFixed(2)} s (${(cpuMs / 1000).toFixed(2)} s CPU)`);
    if (!best || wallMs < best.wallMs) best = { wallMs, cpuMs, keys };
    if (run === 0) {
      await cache.abandon();
      gc();
      gc();
      const heap1 = heldBytes();
      const rss1 = process.memoryUsage().rss;
      row('memory per cached key (JS heap + array buffers)', `${((heap1 - heap0) / keys).toFixed(1)} bytes`, `target < 100; RSS grew ${((rss1 - rss0) / keys).toFixed(1)} bytes per key`);
      // The cache stays reachable until measured.
      if (cache.status().indexKeys !== keys) throw new Error('index changed');
    } else {
      await cache.abandon();
    }
    await medium.close();
  }
  row(
    `replay of ${fmt(best!.keys)} keys (Cache.open), best of ${REPLAY_RUNS}`,
    `${(best!.wallMs / 1000).toFixed(2)} s`,
    `target < 2 s; ${(best!.cpuMs / 1000).toFixed(2)} s of CPU; data_crc off, warm page cache`,
  );
}

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'pcache-bench-'));
  process.env.PCACHE_RUN_DIR ??= join(dir, 'run');
  try {
    if (ONLY !== 'replay') await randomIo(dir);
    if (ONLY !== 'io') await replay(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  const cpu = cpus()[0]?.model ?? 'unknown CPU';
  console.log(`pcache engine, in process, Node ${process.version}, ${availableParallelism()} CPUs (${cpu}), sparse files in ${tmpdir()}\n`);
  console.log('| measure | result | notes |');
  console.log('|---|---|---|');
  for (const [a, b, c] of rows) console.log(`| ${a} | ${b} | ${c} |`);
}

await main();
