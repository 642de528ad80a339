/**
 * One pcache per cache device. Node has no flock(), so the claim is a pid file in the runtime
 * directory, keyed by the device's real path; a file left by a dead process is taken over.
 */
import { createHash, randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { basename, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

export interface DeviceLock {
  /** The device path as the caller gave it. */
  readonly device: string;
  /** The lock file. */
  readonly file: string;
  /** Removes the lock file; safe to call more than once. */
  release(): Promise<void>;
}

/** Where pcache keeps lock files and control sockets. */
export function runDir(): string {
  return process.env.PCACHE_RUN_DIR || '/run/pcache';
}

export async function ensureRunDir(): Promise<string> {
  const dir = runDir();
  await fsp.mkdir(dir, { recursive: true });
  return dir;
}

/** The lock file for a device; the hash keeps names short and unique, the basename readable. */
export async function lockFilePath(device: string): Promise<string> {
  return lockFileFor(await fsp.realpath(device));
}

function lockFileFor(real: string): string {
  const hash = createHash('sha256').update(real).digest('hex').slice(0, 32);
  const readable = basename(real).replace(/[^\w.-]/g, '_').slice(0, 48);
  return join(runDir(), `${readable}-${hash}.lock`);
}

// The pid file cannot tell two opens in one process apart, so they are refused here.
const heldHere = new Set<string>();

const ATTEMPTS = 8;

export async function acquireDeviceLock(device: string, what = 'cache device'): Promise<DeviceLock> {
  const real = await fsp.realpath(device);
  if (heldHere.has(real)) {
    throw busy(`${what} ${device} is already open in this process (pid ${process.pid})`);
  }
  heldHere.add(real);
  try {
    await ensureRunDir();
    const file = lockFileFor(real);
    await take(file, `${process.pid}\n${real}\n`, `${what} ${device}`);
    return new HeldLock(device, real, file);
  } catch (err) {
    heldHere.delete(real);
    throw err;
  }
}

class HeldLock implements DeviceLock {
  private released = false;

  constructor(
    readonly device: string,
    private readonly real: string,
    readonly file: string,
  ) {}

  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    try {
      const now = await readLock(this.file);
      if (now?.pid === process.pid) await fsp.rm(this.file, { force: true });
    } finally {
      // Only after the file is gone: until then a new open here would see our pid and break it.
      heldHere.delete(this.real);
    }
  }
}

async function take(file: string, content: string, label: string): Promise<void> {
  for (let attempt = 0; attempt < ATTEMPTS; attempt++) {
    if (attempt > 0) await sleep(10 * attempt);
    if (await publish(file, content)) return;
    const owner = await readLock(file);
    if (!owner) continue; // released between our attempt and the read
    if (owner.pid !== null && owner.pid !== process.pid && isAlive(owner.pid)) {
      throw busy(`${label} is in use by another pcache (pid ${owner.pid})`);
    }
    // Dead owner, garbage, or our own pid left by an earlier process that had it.
    await breakStale(file, owner.raw);
  }
  throw busy(`${label}: could not take the lock file ${file} after ${ATTEMPTS} attempts`);
}

/**
 * Creates `file` holding `content`, or returns false if it exists. Writing a private file and
 * linking it into place means nobody ever sees the lock file empty or half written.
 */
async function publish(file: string, content: string): Promise<boolean> {
  const tmp = `${file}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`;
  await fsp.writeFile(tmp, content, { flag: 'wx' });
  try {
    await fsp.link(tmp, file);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw err;
  } finally {
    await fsp.rm(tmp, { force: true });
  }
}

/**
 * Removing a stale file races with another process doing the same and then creating its own:
 * the slower one would delete the fresh lock. So removals happen under a short-lived guard
 * file, and only if the lock still holds exactly the content judged stale.
 */
async function breakStale(file: string, staleRaw: string): Promise<void> {
  const guard = `${file}.break`;
  if (!(await publish(guard, `${process.pid}\n`))) {
    const breaker = await readLock(guard);
    // A breaker that died mid-way would block everyone forever.
    if (breaker && (breaker.pid === null || (breaker.pid !== process.pid && !isAlive(breaker.pid)))) {
      await fsp.rm(guard, { force: true });
    }
    return;
  }
  try {
    const now = await readLock(file);
    if (now?.raw === staleRaw) await fsp.rm(file, { force: true });
  } finally {
    await fsp.rm(guard, { force: true });
  }
}

async function readLock(file: string): Promise<{ raw: string; pid: number | null } | undefined> {
  let raw: string;
  try {
    raw = await fsp.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  const m = /^\s*(\d+)\s*$/.exec(raw.split('\n')[0] ?? '');
  const pid = m ? Number(m[1]) : NaN;
  // pid 0 or a negative number would make kill() signal a whole process group.
  return { raw, pid: Number.isSafeInteger(pid) && pid > 0 ? pid : null };
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function busy(message: string): Error {
  return Object.assign(new Error(message), { code: 'EBUSY' });
}
