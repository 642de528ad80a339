/**
 * Write-back drain over a slow backing device (issue 11): how fast the engine empties a cache,
 * against fio writing the same pattern straight to the same backing device, in one run.
 *
 *   node --import tsx bench/drain.ts [--dir DIR] [--delay-ms 2] [--small-mib 64] [--large-mib 512] [--only small|large] [--rounds 3]
 *
 * The backing device is `nbdkit --filter=delay file back.img delay-write=2ms delay-read=2ms` on a
 * unix socket (the stand-in for remote storage); the cache device a 1 GiB file. Per case:
 * - pcache: a cache is filled with every block of the pattern once (random order, FLUSH every
 *   128 writes) while its backing device refuses writes, so nothing is written back yet; it is
 *   closed, reopened on the NBD backing and drain() is timed: every kset read from the cache,
 *   written to the backing device and flushed (one backing flush per kset), dirty_tail persisted.
 *   The cache is full of dirty data when the timed drain starts.
 * - fio: the same blocks (each once, random order) written straight to the same nbdkit, qd32 for
 *   4 KiB and qd4 for 1 MiB, ending with one flush (--end_fsync=1).
 * Cases: 4 KiB keys (64 MiB) against fio 4 KiB qd32; 1 MiB keys (512 MiB) against fio 1 MiB qd4.
 * Each round measures both sides one after the other; the median of the rounds' ratios is
 * reported. The machine is shared: absolute rates are noisy, the ratios of one run are what count.
 */
import { randomFillSync } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BackingDevice } from '../src/backing/backing.js';
import { openNbdBacking } from '../src/backing/nbd.js';
import { Cache } from '../src/cache/cache.js';
import { openFileMedium } from '../src/media/file.js';
import { startNbdkit, type Server } from './nbd/servers.js';
import { run } from './nbd/sys.js';

const MiB = 1024 * 1024;
const CACHE_SIZE = 1024 * MiB;
const BACKING_SIZE = 4096 * MiB;

interface Args {
  dir: string | null;
  delayMs: number;
  smallMiB: number;
  largeMiB: number;
  only: 'small' | 'large' | null;
  rounds: number;
}

function parseArgs(argv: string[]): Args {
  const a: Args = { dir: null, delayMs: 2, smallMiB: 64, largeMiB: 512, only: null, rounds: 3 };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i]!;
    const v = argv[++i];
    if (v === undefined) throw new Error(`${k} needs a value`);
    if (k === '--dir') a.dir = v;
    else if (k === '--delay-ms') a.delayMs = Number(v);
    else if (k === '--small-mib') a.smallMiB = Number(v);
    else if (k === '--large-mib') a.largeMiB = Number(v);
    else if (k === '--only' && (v === 'small' || v === 'large')) a.only = v;
    else if (k === '--rounds' && Number(v) >= 1) a.rounds = Math.floor(Number(v));
    else throw new Error(`unknown argument ${k} ${v}`);
  }
  return a;
}

/** A backing device that refuses every write: write-back retries later and dirty_tail stays put. */
class RefusingBacking implements BackingDevice {
  readonly name = 'refusing';
  constructor(private readonly bytes: number) {}
  size(): number {
    return this.bytes;
  }
  async read(buf: Buffer): Promise<void> {
    buf.fill(0);
  }
  async write(): Promise<void> {
    throw Object.assign(new Error('held back for the benchmark'), { code: 'EIO' });
  }
  async flush(): Promise<void> {}
  async close(): Promise<void> {}
}

/** `count` distinct blocks of `bs` bytes in the first `span` bytes, in random order. */
function randomBlocks(count: number, bs: number, span: number): number[] {
  const slots = Math.floor(span / bs);
  const picked = new Set<number>();
  while (picked.size < count) picked.add(Math.floor(Math.random() * slots));
  return [...picked].map((b) => b * bs);
}

async function fillCache(cachePath: string, offsets: number[], bs: number): Promise<void> {
  await fsp.rm(cachePath, { force: true });
  const medium = await openFileMedium(cachePath, { create: true, sizeIfCreate: CACHE_SIZE });
  const cache = await Cache.open(medium, new RefusingBacking(BACKING_SIZE), { writebackIntervalMs: 60_000 });
  const data = Buffer.allocUnsafe(bs);
  randomFillSync(data);
  for (let i = 0; i < offsets.length; i += 128) {
    await Promise.all(offsets.slice(i, i + 128).map((off) => cache.write(off, data)));
    await cache.flush();
  }
  await cache.close();
  await medium.close();
}

async function timedDrain(cachePath: string, uri: string): Promise<{ seconds: number; bytes: number; ksets: number }> {
  const medium = await openFileMedium(cachePath);
  const backing = await openNbdBacking(uri);
  const cache = await Cache.open(medium, backing, { writebackIntervalMs: 60_000 });
  const t0 = process.hrtime.bigint();
  await cache.drain({ maxErrors: 0 });
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const c = cache.status().counters;
  await cache.close();
  await medium.close();
  await backing.close();
  return { seconds, bytes: c.writtenBackBytes, ksets: c.writtenBackKsets };
}

async function fioDirect(uri: string, bs: number, iodepth: number, totalBytes: number, out: string): Promise<{ seconds: number; bytes: number; cmd: string }> {
  const args = [
    '--name=direct',
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--rw=randwrite',
    `--bs=${bs}`,
    `--iodepth=${iodepth}`,
    '--numjobs=1',
    `--size=${totalBytes}`,
    '--end_fsync=1',
    '--output-format=json',
    `--output=${out}`,
  ];
  const t0 = process.hrtime.bigint();
  const r = await run('fio', args);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.code !== 0) throw new Error(`fio failed: ${r.stderr}`);
  const j = JSON.parse(await fsp.readFile(out, 'utf8')) as { jobs: Array<{ write: { io_bytes: number; runtime: number } }> };
  const w = j.jobs[0]!.write;
  // fio's own run time covers the writes; the final flush is in the wall time measured here.
  return { seconds, bytes: w.io_bytes, cmd: `fio ${args.slice(0, -2).join(' ')}` };
}

async function main(): Promise<void> {
  const a = parseArgs(process.argv.slice(2));
  const dir = a.dir ?? (await fsp.mkdtemp(join(tmpdir(), 'pcache-drain-')));
  await fsp.mkdir(dir, { recursive: true });
  const back = join(dir, 'back.img');
  await fsp.rm(back, { force: true });
  await fsp.writeFile(back, '');
  await fsp.truncate(back, BACKING_SIZE);
  const socket = join(dir, 'delay.sock');
  const nbdkitArgs = ['--filter=delay', 'file', back, `delay-write=${a.delayMs}ms`, `delay-read=${a.delayMs}ms`];
  let server: Server | null = null;
  const lines: string[] = [];
  const say = (l: string): void => {
    console.log(l);
    lines.push(l);
  };
  try {
    server = await startNbdkit({ id: 'delay', label: 'nbdkit delay', socket, args: nbdkitArgs, files: [back], tmpdir: dir, log: join(dir, 'nbdkit.log') });
    say(`backing: nbdkit -U ${socket} ${nbdkitArgs.join(' ')}`);
    const cases = [
      { name: 'small', label: '4 KiB keys', bs: 4096, iodepth: 32, bytes: a.smallMiB * MiB },
      { name: 'large', label: '1 MiB keys', bs: MiB, iodepth: 4, bytes: a.largeMiB * MiB },
    ].filter((c) => a.only === null || a.only === c.name);
    for (const c of cases) {
      const ratios: number[] = [];
      for (let round = 1; round <= a.rounds; round++) {
        const offsets = randomBlocks(c.bytes / c.bs, c.bs, BACKING_SIZE);
        const cachePath = join(dir, 'cache.img');
        await fillCache(cachePath, offsets, c.bs);
        const d = await timedDrain(cachePath, server.uri);
        await fsp.rm(cachePath, { force: true });
        const f = await fioDirect(server.uri, c.bs, c.iodepth, c.bytes, join(dir, `fio-${c.name}.json`));
        const pRate = d.bytes / d.seconds;
        const fRate = f.bytes / f.seconds;
        ratios.push(pRate / fRate);
        say(
          `${c.label}, round ${round}: pcache drain ${(d.bytes / MiB).toFixed(0)} MiB in ${d.seconds.toFixed(2)} s = ${(pRate / c.bs).toFixed(0)} keys/s (${(pRate / MiB).toFixed(1)} MiB/s, ${d.ksets} ksets); ` +
            `fio direct qd${c.iodepth} ${(f.bytes / MiB).toFixed(0)} MiB in ${f.seconds.toFixed(2)} s = ${(fRate / c.bs).toFixed(0)} IOPS (${(fRate / MiB).toFixed(1)} MiB/s); ratio ${(pRate / fRate).toFixed(2)}x`,
        );
        if (round === 1) say(`  fio: ${f.cmd}`);
      }
      const sorted = [...ratios].sort((x, y) => x - y);
      say(`${c.label}: median ratio ${sorted[Math.floor(sorted.length / 2)]!.toFixed(2)}x over ${ratios.length} rounds (${ratios.map((r) => r.toFixed(2)).join(', ')})`);
    }
  } finally {
    await server?.stop();
    if (!a.dir) await fsp.rm(dir, { recursive: true, force: true });
  }
}

await main();
