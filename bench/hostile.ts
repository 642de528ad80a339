/**
 * Two side-by-side measurements for issue 13, pcache serve against nbdkit in the same run:
 *
 * 1. Memory under clients that never read their replies: 12 clients each pipeline 16 reads of
 *    8 MiB (1.5 GiB asked for) over a unix socket and read nothing. Peak RSS while they sit
 *    there, and RSS 5 s after they leave, of pcache serve (empty cache over a sparse file) and
 *    of nbdkit memory (the reference; its 16 threads a connection each hold one request).
 * 2. The cost of TLS: nbdcopy --flush of a random file into the server and back out, over a
 *    unix socket in clear text and with TLS-PSK (the same key file for both servers), pcache
 *    serve (empty cache) and nbdkit file. Each pair alternates, the median of 3 runs counts.
 *
 *   node --import tsx bench/hostile.ts [--size MiB]
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, openSync, ftruncateSync, closeSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { nonReadingClient, rssOf } from '../test/nbd/hostile.js';
import { makePskFile } from '../test/nbd/tls-fixtures.js';

const REPO = fileURLToPath(new URL('../', import.meta.url));
const MiB = 1024 * 1024;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

const { values } = parseArgs({ options: { size: { type: 'string', default: '256' } } });
const copySize = Number(values.size) * MiB;
const dir = mkdtempSync(join(tmpdir(), 'pcache-bench-hostile-'));
const children: ChildProcess[] = [];
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
});

function sparse(name: string, size: number): string {
  const p = join(dir, name);
  const fd = openSync(p, 'w');
  ftruncateSync(fd, size);
  closeSync(fd);
  return p;
}

interface Proc {
  pid: number;
  stop(): Promise<void>;
}

async function startAndWait(cmd: string, args: string[], sock: string, env?: NodeJS.ProcessEnv): Promise<Proc> {
  rmSync(sock, { force: true });
  let stopping = false;
  const child = spawn(cmd, args, { cwd: REPO, env: env ?? process.env, stdio: ['ignore', 'ignore', 'pipe'] });
  child.once('exit', (code, signal) => { if (!stopping) console.error(`${cmd} exited early (${code ?? signal}): ${err}`); });
  children.push(child);
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  for (let i = 0; !existsSync(sock); i++) {
    if (i > 600 || child.exitCode !== null) throw new Error(`${cmd} did not start: ${err}`);
    await sleep(50);
  }
  await sleep(200);
  return {
    pid: child.pid!,
    async stop() {
      stopping = true;
      child.kill('SIGTERM');
      await Promise.race([exited, sleep(10_000).then(() => child.kill('SIGKILL'))]);
      await exited;
    },
  };
}

let serial = 0;
function pcache(extra: string[], backingSize: number): Promise<Proc> & { sock: string } {
  const n = serial++;
  const sock = join(dir, `pcache-${n}.sock`);
  const args = ['--import', 'tsx', 'src/cli/main.ts', 'serve', sparse(`cache-${n}.img`, 1024 * MiB), sparse(`backing-${n}.img`, backingSize), '--socket', sock, ...extra];
  return Object.assign(startAndWait(process.execPath, args, sock, { ...process.env, PCACHE_RUN_DIR: join(dir, `run-${n}`) }), { sock });
}

function nbdkit(extra: string[], plugin: string[]): Promise<Proc> & { sock: string } {
  const sock = join(dir, `nbdkit-${serial++}.sock`);
  return Object.assign(startAndWait('nbdkit', ['-U', sock, '-f', '--exit-with-parent', ...extra, ...plugin], sock), { sock });
}

async function memoryCase(name: string, start: Promise<Proc> & { sock: string }): Promise<{ name: string; base: number; peak: number; after: number }> {
  const p = await start;
  const base = rssOf(p.pid);
  const clients = [];
  for (let i = 0; i < 12; i++) clients.push(await nonReadingClient({ path: start.sock }, 16, 8 * MiB));
  let peak = base;
  for (let i = 0; i < 25 && existsSync(`/proc/${p.pid}/status`); i++) {
    await sleep(200);
    peak = Math.max(peak, rssOf(p.pid));
  }
  for (const c of clients) c.destroy();
  await sleep(5000);
  // nbdkit 1.32 can abort when such clients hang up (an assertion in raw_send_socket).
  const after = existsSync(`/proc/${p.pid}/status`) ? rssOf(p.pid) : Number.NaN;
  await p.stop();
  return { name, base, peak, after };
}

function run(cmd: string, args: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const c = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    c.stderr!.on('data', (d: Buffer) => (err += d.toString()));
    c.once('exit', (code) => (code === 0 ? resolve((performance.now() - t0) / 1000) : reject(new Error(`${cmd} ${args.join(' ')}: ${err}`))));
  });
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function copyCase(start: Promise<Proc> & { sock: string }, uri: (sock: string) => string, src: string): Promise<{ inS: number; outS: number }> {
  const p = await start;
  const u = uri(start.sock);
  const inS = await run('nbdcopy', ['--flush', src, u]);
  const outS = await run('nbdcopy', [u, join(dir, 'out.img')]);
  await p.stop();
  return { inS, outS };
}

async function main(): Promise<void> {
  const lines: string[] = [];
  const say = (s: string): void => {
    lines.push(s);
    console.log(s);
  };
  say(`load average at the start: ${(await import('node:os')).loadavg().map((x) => x.toFixed(2)).join(' ')}`);

  const mem = [
    await memoryCase('pcache serve', pcache([], 8192 * MiB)),
    await memoryCase('nbdkit memory', nbdkit([], ['memory', String(8192 * MiB)])),
  ];
  say('\nRSS, 12 clients x 16 pipelined 8 MiB reads, none read (MiB):');
  say('| server | at start | peak | 5 s after they left |');
  say('|---|---|---|---|');
  for (const m of mem) {
    const after = Number.isNaN(m.after) ? 'exited (crashed when the clients hung up)' : (m.after / MiB).toFixed(0);
    say(`| ${m.name} | ${(m.base / MiB).toFixed(0)} | ${(m.peak / MiB).toFixed(0)} | ${after} |`);
  }
  say(`peak RSS ratio pcache / nbdkit: ${(mem[0]!.peak / mem[1]!.peak).toFixed(2)}`);

  const { file } = makePskFile(join(dir, 'psk'), ['bench']);
  const src = join(dir, 'src.img');
  writeFileSync(src, randomBytes(copySize));
  const plainUri = (s: string): string => `nbd+unix:///?socket=${s}`;
  // libnbd 1.14 wants the PSK user in the URI's user part (tls-username alone calls getlogin).
  const tlsUri = (s: string): string => `nbds+unix://bench@/?socket=${s}&tls-psk-file=${file}`;
  const tlsArgs = ['--tls', 'require', '--tls-psk', file];
  const rows: Record<string, { inS: number[]; outS: number[] }> = {};
  const cases: Array<[string, () => Promise<Proc> & { sock: string }, (s: string) => string]> = [
    ['pcache clear', () => pcache([], copySize), plainUri],
    ['pcache TLS-PSK', () => pcache(tlsArgs, copySize), tlsUri],
    ['nbdkit file clear', () => nbdkit([], ['file', sparse(`kit-${serial}.img`, copySize)]), plainUri],
    ['nbdkit file TLS-PSK', () => nbdkit(['--tls=require', `--tls-psk=${file}`], ['file', sparse(`kit-${serial}.img`, copySize)]), tlsUri],
  ];
  for (let round = 0; round < 3; round++) {
    for (const [name, start, uri] of cases) {
      const r = await copyCase(start(), uri, src);
      (rows[name] ??= { inS: [], outS: [] }).inS.push(r.inS);
      rows[name]!.outS.push(r.outS);
    }
  }
  const m = (name: string, k: 'inS' | 'outS'): number => median(rows[name]![k]);
  say(`\nnbdcopy of ${copySize / MiB} MiB over a unix socket, median of 3 (seconds):`);
  say('| server | copy in (--flush) | copy out |');
  say('|---|---|---|');
  for (const [name] of cases) say(`| ${name} | ${m(name, 'inS').toFixed(2)} | ${m(name, 'outS').toFixed(2)} |`);
  for (const k of ['inS', 'outS'] as const) {
    const what = k === 'inS' ? 'copy in' : 'copy out';
    say(`${what}: TLS / clear: pcache ${(m('pcache TLS-PSK', k) / m('pcache clear', k)).toFixed(2)}, nbdkit ${(m('nbdkit file TLS-PSK', k) / m('nbdkit file clear', k)).toFixed(2)}; pcache TLS / nbdkit TLS ${(m('pcache TLS-PSK', k) / m('nbdkit file TLS-PSK', k)).toFixed(2)}`);
  }
  say(`load average at the end: ${(await import('node:os')).loadavg().map((x) => x.toFixed(2)).join(' ')}`);
}

await main();
