/**
 * Who owns a device. The claim is an OS lock (on Linux an open-file-description lock, fcntl
 * F_OFD_SETLK) on the descriptor the device is open on. It belongs to the inode, so every path,
 * hard link, container and run directory sees it, and the kernel drops it with the descriptor,
 * however the process ends: there is nothing stale to take over.
 *
 * The runtime directory (PCACHE_RUN_DIR, /run/pcache) only says where a server's control socket
 * is; it no longer decides who owns a device.
 */
import { promises as fsp, fstatSync } from 'node:fs';
import { join } from 'node:path';
import fsx from 'fs-native-extensions';

/** Splits a Linux dev_t as glibc's major()/minor() do; BigInt because dev_t is 64 bits. */
export function devMajorMinor(rdev: bigint): { major: number; minor: number } {
  const major = ((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & 0xfffff000n);
  const minor = (rdev & 0xffn) | ((rdev >> 12n) & 0xffffff00n);
  return { major: Number(major), minor: Number(minor) };
}

/** exclusive: pcache serve and every tool that writes; shared: the tools that only read. */
export type LockMode = 'exclusive' | 'shared';

/** Where pcache keeps control sockets. */
export function runDir(): string {
  return process.env.PCACHE_RUN_DIR || '/run/pcache';
}

/**
 * Creates the runtime directory owner-only (0700, whatever the umask), or tightens one we own.
 * `extraMode` adds search bits for operators who give a group access to the sockets inside.
 * A shared directory (sticky or writable by all, such as /tmp given as PCACHE_RUN_DIR) is left
 * as it is: the sockets in it are private by their own mode.
 */
export async function ensureRunDir(extraMode = 0, group?: number): Promise<string> {
  const dir = runDir();
  const created = await fsp.mkdir(dir, { recursive: true, mode: 0o700 });
  const st = await fsp.stat(dir);
  const shared = (st.mode & 0o1002) !== 0;
  if (created !== undefined || (!shared && typeof process.getuid === 'function' && st.uid === process.getuid())) {
    // mkdir's mode is filtered by the umask, and a directory made by an older pcache may be 0755.
    await fsp.chmod(dir, 0o700 | (extraMode & 0o011));
    if (group !== undefined) await fsp.chown(dir, st.uid, group);
  }
  return dir;
}

export interface LockHolder {
  pid: number;
  /** The holder's command line, shortened; '' when it cannot be read. */
  command: string;
  isPcache: boolean;
}

/**
 * Takes the OS lock on an open descriptor, or throws EBUSY naming who holds it. `label` names
 * the device in messages, e.g. 'cache device /dev/sdb'.
 */
export async function lockDescriptor(fd: number, mode: LockMode, label: string): Promise<void> {
  let taken: boolean;
  try {
    taken = fsx.tryLock(fd, { shared: mode === 'shared' });
  } catch (err) {
    // Running unguarded on a filesystem without locks would bring back the two-owner data loss.
    const code = (err as NodeJS.ErrnoException).code ?? 'EIO';
    throw Object.assign(new Error(`${label}: cannot lock it (${code}): the filesystem does not support file locks`), { code, cause: err });
  }
  if (taken) return;
  const st = fstatSync(fd, { bigint: true });
  const holders = await lockHolders(st.dev, st.ino);
  throw Object.assign(new Error(`${label} is in use by ${describeHolders(holders)}`), { code: 'EBUSY' });
}

export function describeHolders(holders: readonly LockHolder[]): string {
  const h = holders.find((x) => x.pid !== process.pid) ?? holders[0];
  if (!h) return 'another pcache or program (it holds a lock on the device)';
  if (h.pid === process.pid) return `this process (pid ${h.pid}): it is already open here`;
  return `another ${h.isPcache ? 'pcache' : 'program'} (pid ${h.pid}${h.command ? `: ${h.command}` : ''})`;
}

/** Bounds the scan of /proc on a machine with very many open files. */
const MAX_FDINFO_READS = 50_000;

/**
 * The processes holding a lock on the inode (dev, ino). An OFD lock records no pid (/proc/locks
 * shows -1), but /proc/PID/fdinfo/FD lists the locks held through each descriptor, as
 * "lock: 1: OFDLCK ADVISORY WRITE -1 MAJ:MIN:INO 0 EOF". Only processes this one may inspect
 * (its own user's, or all as root) and in its pid namespace are found.
 */
export async function lockHolders(dev: bigint, ino: bigint, procRoot = '/proc'): Promise<LockHolder[]> {
  const { major, minor } = devMajorMinor(dev);
  const needle = ` ${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}:${ino} `;
  const found: LockHolder[] = [];
  let reads = 0;
  let pids: string[];
  try {
    pids = (await fsp.readdir(procRoot)).filter((p) => /^\d+$/.test(p));
  } catch {
    return found;
  }
  for (const pid of pids) {
    let fds: string[];
    try {
      fds = await fsp.readdir(join(procRoot, pid, 'fdinfo'));
    } catch {
      continue;
    }
    for (const fd of fds) {
      if (++reads > MAX_FDINFO_READS) return found;
      let info: string;
      try {
        info = await fsp.readFile(join(procRoot, pid, 'fdinfo', fd), 'utf8');
      } catch {
        continue;
      }
      if (!info.split('\n').some((l) => l.startsWith('lock:') && l.includes(needle))) continue;
      found.push({ pid: Number(pid), ...(await commandOf(procRoot, pid)) });
      break;
    }
  }
  return found;
}

async function commandOf(procRoot: string, pid: string): Promise<{ command: string; isPcache: boolean }> {
  let argv: string[];
  try {
    argv = (await fsp.readFile(join(procRoot, pid, 'cmdline'), 'utf8')).split('\0').filter(Boolean);
  } catch {
    return { command: '', isPcache: false };
  }
  // `node --import tsx .../src/cli/main.ts serve ...` or `.../bin/pcache serve ...` reads as `pcache serve ...`.
  const entry = argv.findIndex((a) => /(?:^|\/)(?:src\/cli\/main\.[jt]s|bin\/pcache(?:\.js)?|pcache)$/.test(a));
  const words = entry >= 0 ? ['pcache', ...argv.slice(entry + 1)] : argv;
  const command = words.join(' ').replace(/\s+/g, ' ');
  return { command: command.length > 160 ? `${command.slice(0, 157)}...` : command, isPcache: entry >= 0 };
}
