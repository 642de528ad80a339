/** Small system helpers for the benchmark: child processes, CPU time, page cache, machine facts. */
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { promises as fsp, readdirSync, readFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** A size as options give it: 512M, 2G, 1536MiB, 4096. */
export function parseSize(text: string): number {
  const m = /^(\d+)([KMG]?)i?B?$/i.exec(text.trim());
  if (!m) throw new Error(`bad size '${text}'`);
  const unit = { '': 1, K: KiB, M: MiB, G: GiB }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G'];
  return Number(m[1]) * unit;
}

/** Every child this process starts, so that an interrupted run can end them all. */
export const children = new Set<ChildProcess>();

export function track(child: ChildProcess): ChildProcess {
  children.add(child);
  child.once('exit', () => children.delete(child));
  child.once('error', () => children.delete(child));
  return child;
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Run a command to its end, collecting its output; never rejects for a nonzero exit. */
export function run(cmd: string, args: readonly string[], opts: SpawnOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = track(spawn(cmd, args, { ...opts, stdio: ['ignore', 'pipe', 'pipe'] }));
    let stdout = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.once('error', reject);
    child.once('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

/** The first line a command prints, or '' when it cannot run. */
export async function firstLine(cmd: string, args: readonly string[]): Promise<string> {
  try {
    const r = await run(cmd, args);
    return (r.stdout || r.stderr).split('\n')[0]!.trim();
  } catch {
    return '';
  }
}

let clockTicks = 100;

export async function initClockTicks(): Promise<void> {
  const t = Number(await firstLine('getconf', ['CLK_TCK']));
  if (Number.isFinite(t) && t > 0) clockTicks = t;
}

/**
 * User plus system CPU seconds of the processes (all their threads), from /proc/<pid>/stat.
 * A process that is gone counts as zero.
 */
export function cpuSeconds(pids: readonly number[]): number {
  let ticks = 0;
  for (const pid of pids) {
    let stat: string;
    try {
      stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    } catch {
      continue;
    }
    // The command name is in parentheses and may hold spaces; the fields after it start at 3.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    ticks += Number(fields[14 - 3]) + Number(fields[15 - 3]);
  }
  return ticks / clockTicks;
}

/**
 * User plus system CPU seconds of each thread of a process, summed by thread name
 * (/proc/<pid>/task/<tid>/stat): the main thread is named after the program.
 */
export function threadCpuSeconds(pid: number): Map<string, number> {
  const out = new Map<string, number>();
  let tids: string[];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return out;
  }
  for (const tid of tids) {
    let stat: string;
    try {
      stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    } catch {
      continue;
    }
    const name = tid === String(pid) ? 'main thread' : stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'));
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    out.set(name, (out.get(name) ?? 0) + (Number(fields[14 - 3]) + Number(fields[15 - 3])) / clockTicks);
  }
  return out;
}

/** Busy CPU seconds of the whole machine so far (all cores), from /proc/stat. */
export function systemBusySeconds(): number {
  const line = readFileSync('/proc/stat', 'utf8').split('\n')[0]!;
  const f = line.trim().split(/\s+/).slice(1).map(Number);
  // user nice system idle iowait irq softirq steal (guest time is already in user)
  const busy = f[0]! + f[1]! + f[2]! + f[5]! + f[6]! + f[7]!;
  return busy / clockTicks;
}

/** CPU seconds of this process's reaped children (fio, once it has exited) and of this process. */
export function ownCpuSeconds(): { children: number; self: number } {
  const stat = readFileSync('/proc/self/stat', 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { self: (Number(f[14 - 3]) + Number(f[15 - 3])) / clockTicks, children: (Number(f[16 - 3]) + Number(f[17 - 3])) / clockTicks };
}

export function loadAverage(): string {
  try {
    return readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  } catch {
    return 'unknown';
  }
}

/** A sparse file of `size` bytes (replacing any file there). */
export async function sparseFile(path: string, size: number): Promise<void> {
  const fh = await fsp.open(path, 'w');
  try {
    await fh.truncate(size);
  } finally {
    await fh.close();
  }
}

/** Write non-zero, incompressible data over [offset, offset + length) of an existing file. */
export async function fillFile(path: string, offset: number, length: number): Promise<void> {
  const chunk = Buffer.allocUnsafe(4 * MiB);
  randomFillSync(chunk);
  const fh = await fsp.open(path, 'r+');
  try {
    for (let done = 0; done < length; done += chunk.length) {
      const n = Math.min(chunk.length, length - done);
      // Vary each chunk a little, so that no two blocks of the file are alike.
      chunk.writeDoubleLE(offset + done, 0);
      await fh.write(chunk, 0, n, offset + done);
    }
    await fh.datasync();
  } finally {
    await fh.close();
  }
}

/** Write a file's dirty pages to disk. */
export async function syncFile(path: string): Promise<void> {
  const fh = await fsp.open(path, 'r+');
  try {
    await fh.datasync();
  } finally {
    await fh.close();
  }
}

/**
 * Write a file's dirty pages and drop the file from the page cache (posix_fadvise DONTNEED via
 * dd, which Node cannot call itself), so that the next read of it goes to the disk.
 */
export async function dropFileCache(path: string): Promise<void> {
  const r = await run('dd', ['if=/dev/null', `of=${path}`, 'oflag=nocache', 'conv=notrunc,fdatasync', 'count=0', 'status=none']);
  if (r.code !== 0) throw new Error(`dropping ${path} from the page cache failed: ${r.stderr.trim()}`);
}

/** The machine and tool versions, recorded at the top of the report. */
export interface MachineInfo {
  cpus: number;
  cpuModel: string;
  memGiB: number;
  kernel: string;
  node: string;
  fio: string;
  nbdkit: string;
  nbdcopy: string;
  filesystem: string;
  gitCommit: string;
  gitDirty: boolean;
  loadAtStart: string;
  loadAtEnd: string;
}

export async function machineInfo(dir: string, repo: string): Promise<MachineInfo> {
  const df = (await run('df', ['-T', dir]).catch(() => null))?.stdout.trim().split('\n')[1]?.split(/\s+/) ?? [];
  const git = await run('git', ['status', '--porcelain', '--untracked-files=no'], { cwd: repo }).catch(() => null);
  return {
    cpus: Number(await firstLine('nproc', [])) || cpus().length,
    cpuModel: cpus()[0]?.model.trim() ?? 'unknown',
    memGiB: Math.round(totalmem() / GiB),
    kernel: await firstLine('uname', ['-r']),
    node: process.version,
    fio: await firstLine('fio', ['--version']),
    nbdkit: await firstLine('nbdkit', ['--version']),
    nbdcopy: await firstLine('nbdcopy', ['--version']),
    filesystem: df.length >= 2 ? `${df[1]} on ${df[0]}` : 'unknown',
    gitCommit: (await run('git', ['rev-parse', '--short', 'HEAD'], { cwd: repo }).catch(() => null))?.stdout.trim() ?? 'unknown',
    gitDirty: !!git && git.stdout.trim() !== '',
    loadAtStart: loadAverage(),
    loadAtEnd: '',
  };
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Whether `p` settles within `ms`; the timer does not outlive the wait. */
export async function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p.then(() => true), new Promise<boolean>((r) => (timer = setTimeout(() => r(false), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}
