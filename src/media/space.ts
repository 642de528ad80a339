/**
 * Giving a cache file all its blocks up front. A sparse cache file takes blocks from its
 * filesystem as the cache first writes each part; on a full filesystem those writes fail with
 * ENOSPC although the cache itself has room. Node has no fallocate(2), so util-linux's
 * fallocate(1) does it, on this process's descriptor (/proc/PID/fd/N), so that it is the file we
 * hold and locked, whatever happened to the path since.
 */
import { execFile } from 'node:child_process';
import { fstatSync, promises as fsp } from 'node:fs';

const MiB = 1024 * 1024;

function human(bytes: number): string {
  return bytes >= 1024 * MiB ? `${(bytes / (1024 * MiB)).toFixed(1)} GiB` : `${(bytes / MiB).toFixed(1)} MiB`;
}

/** What `--sparse` risks, for help texts and messages. */
export const SPARSE_RISK =
  'a sparse cache file takes its blocks as the cache first writes them: if the filesystem fills up, ' +
  'writes to the cache fail with ENOSPC although the cache has room';

function noSpace(label: string, size: number, need: number, free: number): Error {
  return Object.assign(
    new Error(
      `${label}: not enough space to allocate ${human(size)}: ${human(need)} more is needed and its filesystem has ` +
        `${human(free)} free (free some space, use a smaller file, or --sparse: ${SPARSE_RISK})`,
    ),
    { code: 'ENOSPC' },
  );
}

function run(args: string[]): Promise<{ ok: boolean; stderr: string; missing: boolean }> {
  return new Promise((resolve) => {
    execFile('fallocate', args, (err, _stdout, stderr) => {
      resolve({ ok: !err, stderr: String(stderr).trim(), missing: (err as NodeJS.ErrnoException | null)?.code === 'ENOENT' });
    });
  });
}

/** Allocates every block of the regular file open on `fd` up to `size` bytes; its data is kept. */
export async function allocateFile(fd: number, size: number, label: string): Promise<void> {
  const path = `/proc/${process.pid}/fd/${fd}`;
  const held = Number(fstatSync(fd).blocks) * 512;
  const need = Math.max(0, size - held);
  if (need === 0) return;
  const fs = await fsp.statfs(path);
  const free = fs.bavail * fs.bsize;
  // Checked first for the message; fallocate itself is the real test (quotas, reserved blocks).
  if (need > free) throw noSpace(label, size, need, free);
  let r = await run(['-l', String(size), path]);
  // Filesystems without fallocate(2): posix_fallocate writes zeros into the holes instead.
  if (!r.ok && /not supported/i.test(r.stderr)) r = await run(['--posix', '-l', String(size), path]);
  if (r.ok) return;
  if (r.missing) throw new Error(`${label}: allocating it needs fallocate(1) from util-linux, which is not installed (or use --sparse: ${SPARSE_RISK})`);
  if (/no space/i.test(r.stderr)) {
    const after = await fsp.statfs(path);
    throw noSpace(label, size, Math.max(0, size - Number(fstatSync(fd).blocks) * 512), after.bavail * after.bsize);
  }
  throw new Error(`${label}: allocating ${human(size)} failed: ${r.stderr || 'fallocate failed'}`);
}
