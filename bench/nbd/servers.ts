/** The servers under test: pcache serve and nbdkit, each on a unix socket, started and stopped here. */
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, promises as fsp } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { controlRequest } from '../../src/cli/control.js';
import { dropFileCache, sleep, syncFile, track, within } from './sys.js';

export interface Server {
  readonly id: string;
  readonly label: string;
  readonly uri: string;
  /** The command lines that started it (more than one when it stands on another server). */
  readonly commands: string[];
  /** The pcache cache device, when this is pcache. */
  readonly cacheDev: string | null;
  /** The processes whose CPU time counts for this server. */
  pids(): number[];
  /** After a write case, untimed: write back (pcache) and make the files durable. */
  settle(): Promise<void>;
  /** Before an uncached read: drop the backing files from the page cache. */
  dropCaches(): Promise<void>;
  stop(): Promise<void>;
}

export interface Proc {
  child: ChildProcess;
  exited: Promise<void>;
  log: string;
  logText(): Promise<string>;
  /** Its standard output so far (also in the log). */
  stdout(): string;
}

export function startProc(cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv; log: string }): Proc {
  const out = createWriteStream(opts.log);
  const child = track(spawn(cmd, args, { cwd: opts.cwd, env: opts.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] }));
  let stdout = '';
  child.stdout!.on('data', (d: Buffer) => {
    stdout += d.toString('utf8');
    out.write(d);
  });
  child.stderr!.on('data', (d: Buffer) => out.write(d));
  const exited = new Promise<void>((resolve) => {
    child.once('exit', () => resolve());
    child.once('error', (err) => {
      out.write(`spawn failed: ${err.message}\n`);
      resolve();
    });
  });
  return {
    child,
    exited,
    log: opts.log,
    async logText() {
      return fsp.readFile(opts.log, 'utf8').catch(() => '');
    },
    stdout: () => stdout,
  };
}

export function running(p: Proc): boolean {
  return p.child.exitCode === null && p.child.signalCode === null && p.child.pid !== undefined;
}

/** End a process: ask politely, then firmly. */
export async function endProc(p: Proc, graceMs: number): Promise<void> {
  if (!running(p)) return;
  if (await within(p.exited, graceMs)) return;
  p.child.kill('SIGTERM');
  if (await within(p.exited, 5000)) return;
  p.child.kill('SIGKILL');
  await p.exited;
}

async function tail(p: Proc): Promise<string> {
  const text = (await p.logText()).trim().split('\n').slice(-8).join('\n');
  return text ? `:\n${text}` : '';
}

/** Wait until an NBD server answers on the socket with its greeting. */
export async function waitNbd(socket: string, p: Proc, what: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (!running(p)) throw new Error(`${what} exited before it was ready${await tail(p)}`);
    const ok = await new Promise<boolean>((resolve) => {
      const sock = net.connect(socket);
      let got = '';
      const done = (v: boolean): void => {
        sock.destroy();
        resolve(v);
      };
      sock.setTimeout(1000, () => done(false));
      sock.on('error', () => done(false));
      sock.on('data', (d: Buffer) => {
        got += d.toString('latin1');
        if (got.length >= 8) done(got.startsWith('NBDMAGIC'));
      });
    });
    if (ok) return;
    await sleep(50);
  }
  throw new Error(`${what} did not answer on ${socket} within ${timeoutMs / 1000} s${await tail(p)}`);
}

function quote(a: string): string {
  if (/^[\w@%+=:,./-]+$/.test(a)) return a;
  // Double quotes where they are safe, so that a $DIR put in later still expands when pasted.
  return /^[^"$`\\!]*$/.test(a) ? `"${a}"` : `'${a.replace(/'/g, `'\\''`)}'`;
}

export function commandLine(cmd: string, args: readonly string[]): string {
  return [cmd, ...args].map(quote).join(' ');
}

export interface NbdkitSpec {
  id: string;
  label: string;
  socket: string;
  /** Everything after the common options: filters, plugin, parameters. */
  args: string[];
  /** Local files it serves (synced after write cases, dropped before uncached reads). */
  files: string[];
  /** Where the cache filter puts its cache file. */
  tmpdir: string;
  log: string;
}

export async function startNbdkit(spec: NbdkitSpec): Promise<Server> {
  await fsp.rm(spec.socket, { force: true });
  const args = ['-U', spec.socket, '--foreground', '--exit-with-parent', ...spec.args];
  const p = startProc('nbdkit', args, { env: { ...process.env, TMPDIR: spec.tmpdir }, log: spec.log });
  try {
    await waitNbd(spec.socket, p, `nbdkit (${spec.label})`);
  } catch (err) {
    await endProc(p, 0);
    throw err;
  }
  return {
    id: spec.id,
    label: spec.label,
    uri: `nbd+unix:///?socket=${spec.socket}`,
    commands: [commandLine('nbdkit', args)],
    cacheDev: null,
    pids: () => (p.child.pid !== undefined && running(p) ? [p.child.pid] : []),
    async settle() {
      for (const f of spec.files) await syncFile(f);
    },
    async dropCaches() {
      for (const f of spec.files) await dropFileCache(f);
    },
    async stop() {
      if (running(p)) p.child.kill('SIGTERM');
      await endProc(p, 10_000);
      await fsp.rm(spec.socket, { force: true });
    },
  };
}

export interface PcacheSpec {
  id: string;
  label: string;
  repo: string;
  socket: string;
  cacheDev: string;
  /** A local path, or the URI of `below`. */
  backingDev: string;
  /** Local files behind it (the backing file, directly or through `below`). */
  backingFiles: string[];
  /** The server pcache's backing device stands on, stopped with it and counted in its CPU. */
  below?: Server;
  runDir: string;
  log: string;
  /** Extra options for node itself, before the script (e.g. --cpu-prof). */
  nodeArgs?: string[];
}

/** Stats the benchmark reads from a running pcache (a subset of `pcache stats --json`). */
export interface PcacheStats {
  dirtyBytes: number;
  writtenBackBytes: number;
  reads: number;
  readHits: number;
  readMisses: number;
  readBytes: number;
  readHitBytes: number;
  /** Segments in use and in all, as `pcache status` prints them: how full the cache is. */
  segsUsed: number;
  segNum: number;
}

async function control(cacheDev: string, cmd: string, args: string[] = []): Promise<unknown> {
  const res = await controlRequest(cacheDev, { cmd, args });
  if (!res.ok) throw new Error(`pcache ${cmd}: ${res.error ?? 'refused'}`);
  return res.data;
}

export async function pcacheStats(cacheDev: string): Promise<PcacheStats> {
  const d = (await control(cacheDev, 'stats')) as { dirtyBytes?: number; segsUsed?: number; segNum?: number; counters?: Record<string, number> } | undefined;
  const c = d?.counters ?? {};
  return {
    dirtyBytes: d?.dirtyBytes ?? 0,
    writtenBackBytes: c.writtenBackBytes ?? 0,
    reads: c.reads ?? 0,
    readHits: c.readHits ?? 0,
    readMisses: c.readMisses ?? 0,
    readBytes: c.readBytes ?? 0,
    readHitBytes: c.readHitBytes ?? 0,
    segsUsed: d?.segsUsed ?? 0,
    segNum: d?.segNum ?? 0,
  };
}

/** `pcache flush` through the control socket, in this process (so no CLI start-up is timed). */
export async function pcacheFlush(cacheDev: string): Promise<void> {
  await control(cacheDev, 'flush');
}

export async function startPcache(spec: PcacheSpec): Promise<Server> {
  await fsp.rm(spec.socket, { force: true });
  // Through bin/pcache.js, as a user starts it: it sizes libuv's thread pool before the pool exists.
  const args = [...(spec.nodeArgs ?? []), join(spec.repo, 'bin/pcache.js'), 'serve', spec.cacheDev, spec.backingDev, '--socket', spec.socket];
  const env = { ...process.env, PCACHE_RUN_DIR: spec.runDir };
  const p = startProc(process.execPath, args, { cwd: spec.repo, env, log: spec.log });
  const stopBelow = async (): Promise<void> => {
    await spec.below?.stop();
  };
  try {
    // Ready when the status line (`0 <sectors> pcache ...`) is out on stdout.
    const deadline = Date.now() + 120_000;
    for (;;) {
      if (!running(p)) throw new Error(`pcache serve exited before it was ready${await tail(p)}`);
      if (p.stdout().split('\n').some((l) => l.includes(' pcache '))) break;
      if (Date.now() > deadline) throw new Error(`pcache serve did not start within 120 s${await tail(p)}`);
      await sleep(50);
    }
    await waitNbd(spec.socket, p, 'pcache serve');
  } catch (err) {
    await endProc(p, 0);
    await stopBelow();
    throw err;
  }
  const server: Server = {
    id: spec.id,
    label: spec.label,
    uri: `nbd+unix:///?socket=${spec.socket}`,
    commands: [...(spec.below?.commands ?? []), `PCACHE_RUN_DIR=${spec.runDir} ${commandLine('node', args)}`],
    cacheDev: spec.cacheDev,
    pids: () => [...(p.child.pid !== undefined && running(p) ? [p.child.pid] : []), ...(spec.below?.pids() ?? [])],
    async settle() {
      await pcacheFlush(spec.cacheDev);
      await spec.below?.settle();
      for (const f of spec.backingFiles) await syncFile(f);
    },
    async dropCaches() {
      for (const f of spec.backingFiles) await dropFileCache(f);
    },
    async stop() {
      if (running(p)) {
        try {
          await control(spec.cacheDev, 'stop');
        } catch {
          p.child.kill('SIGTERM');
        }
      }
      await endProc(p, 120_000);
      await fsp.rm(spec.socket, { force: true });
      await stopBelow();
    },
  };
  return server;
}
