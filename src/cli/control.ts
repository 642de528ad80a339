/**
 * Control of a running server, addressed by its cache device: the server listens on a unix socket
 * in the runtime directory named from the device's real path; commands connect, send one JSON
 * line, and read JSON lines back (progress, then one result).
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { ensureRunDir, runDir } from '../media/lock.js';
import { CliError, UsageError } from './errors.js';

export interface ControlRequest {
  cmd: string;
  args: string[];
}

export interface ControlResult {
  type: 'result';
  ok: boolean;
  output?: string;
  error?: string;
  data?: unknown;
}

export interface ControlProgress {
  type: 'progress';
  data: unknown;
}

export type ControlReply = ControlResult | ControlProgress;

export type ControlHandler = (req: ControlRequest, progress: (data: unknown) => void) => Promise<ControlResult>;

export async function controlSocketPath(cacheDev: string): Promise<string> {
  let st;
  try {
    st = await fsp.stat(cacheDev, { bigint: true });
  } catch {
    throw new CliError(`cache device ${cacheDev} does not exist`);
  }
  // Named after what the device is, not the path used: a hard link, a symlink or a relative path
  // to the device all find its server. Unix socket paths are short (108 bytes): a hash it is.
  const id = st.isBlockDevice() ? `block ${st.rdev}` : `file ${st.dev} ${st.ino}`;
  const hash = createHash('sha256').update(id).digest('hex').slice(0, 24);
  return join(runDir(), `pcache-${hash}.sock`);
}

/** Who may connect to the sockets a server creates: owner-only (0600) unless the operator says. */
export interface SocketAccess {
  mode: number;
  /** A group id to give the sockets (and the runtime directory) to. */
  group?: number;
}

export const PRIVATE_SOCKETS: SocketAccess = { mode: 0o600 };

/** `--socket-mode` (octal, e.g. 0660) and `--socket-group` (a name or a number). */
export function parseSocketAccess(modeText: string | undefined, groupText: string | undefined): SocketAccess {
  let mode = PRIVATE_SOCKETS.mode;
  if (modeText !== undefined) {
    if (!/^0?[0-7]{3}$/.test(modeText)) throw new UsageError(`--socket-mode takes an octal mode such as 0660, not '${modeText}'`);
    mode = parseInt(modeText, 8);
    if ((mode & 0o600) !== 0o600) throw new UsageError(`--socket-mode ${modeText} must let the owner read and write (0600)`);
  }
  return groupText === undefined ? { mode } : { mode, group: resolveGroup(groupText) };
}

function resolveGroup(text: string): number {
  if (/^\d+$/.test(text)) return Number(text);
  let line = '';
  try {
    // getent asks NSS as the C library would (files, LDAP, ...); Node has no getgrnam().
    line = execFileSync('getent', ['group', text], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  } catch {
    throw new UsageError(`--socket-group: no group named '${text}'`);
  }
  const gid = Number(line.split(':')[2]);
  if (!Number.isSafeInteger(gid)) throw new UsageError(`--socket-group: cannot read the id of group '${text}'`);
  return gid;
}

/**
 * Runs `listen` (which creates a unix socket at `path`) so that the socket is never reachable
 * by others, whatever the umask, then gives it `access`. The umask is the only way to set the
 * mode a socket is created with; it is tightened only for the duration of the call.
 */
export async function listenPrivately<T>(path: string, access: SocketAccess, listen: () => Promise<T>): Promise<T> {
  const old = process.umask(0o077);
  let result: T;
  try {
    result = await listen();
  } finally {
    process.umask(old);
  }
  await fsp.chmod(path, access.mode);
  if (access.group !== undefined) await fsp.chown(path, -1, access.group);
  return result;
}

/** Search bits on the runtime directory for those the sockets' mode lets in. */
function runDirExtraMode(access: SocketAccess): number {
  return (access.mode & 0o060 ? 0o010 : 0) | (access.mode & 0o006 ? 0o001 : 0);
}

export async function startControlServer(
  cacheDev: string,
  handle: ControlHandler,
  access: SocketAccess = PRIVATE_SOCKETS,
): Promise<{ path: string; close(): Promise<void> }> {
  await ensureRunDir(runDirExtraMode(access), access.group);
  const path = await controlSocketPath(cacheDev);
  // The caller holds the device lock, so a socket left here belongs to a dead server.
  await fsp.rm(path, { force: true });
  const sockets = new Set<net.Socket>();
  const server = net.createServer((sock) => {
    sockets.add(sock);
    sock.on('close', () => sockets.delete(sock));
    sock.on('error', () => undefined);
    let buf = '';
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      buf += chunk;
      if (buf.length > 64 * 1024) sock.destroy();
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      const line = buf.slice(0, nl);
      buf = '';
      sock.pause();
      let req: ControlRequest;
      try {
        const parsed = JSON.parse(line) as Partial<ControlRequest>;
        if (typeof parsed.cmd !== 'string' || !Array.isArray(parsed.args) || !parsed.args.every((a) => typeof a === 'string')) throw new Error('bad request');
        req = { cmd: parsed.cmd, args: parsed.args };
      } catch {
        sock.end(JSON.stringify({ type: 'result', ok: false, error: 'malformed control request' }) + '\n');
        return;
      }
      const send = (r: ControlReply): void => {
        if (!sock.destroyed) sock.write(JSON.stringify(r) + '\n');
      };
      handle(req, (data) => send({ type: 'progress', data })).then(
        (result) => {
          send(result);
          sock.end();
        },
        (err) => {
          send({ type: 'result', ok: false, error: err instanceof Error ? err.message : String(err) });
          sock.end();
        },
      );
    });
  });
  await listenPrivately(
    path,
    access,
    () =>
      new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(path, () => {
          server.off('error', reject);
          resolve();
        });
      }),
  );
  return {
    path,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
      await fsp.rm(path, { force: true });
    },
  };
}

/**
 * Send one request to the server of `cacheDev`; `onProgress` sees progress replies. Aborting
 * `signal` drops the connection and rejects with its reason (the server carries on regardless).
 */
export async function controlRequest(
  cacheDev: string,
  req: ControlRequest,
  onProgress?: (data: unknown) => void,
  signal?: AbortSignal,
): Promise<ControlResult> {
  const path = await controlSocketPath(cacheDev);
  return new Promise((resolve, reject) => {
    const sock = net.createConnection(path);
    if (signal) {
      const onAbort = (): void => {
        reject(signal.reason);
        sock.destroy();
      };
      if (signal.aborted) onAbort();
      signal.addEventListener('abort', onAbort, { once: true });
      sock.on('close', () => signal.removeEventListener('abort', onAbort));
    }
    let buf = '';
    let result: ControlResult | undefined;
    sock.setEncoding('utf8');
    sock.on('connect', () => sock.write(JSON.stringify(req) + '\n'));
    sock.on('data', (chunk: string) => {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        let reply: ControlReply;
        try {
          reply = JSON.parse(line) as ControlReply;
        } catch {
          continue;
        }
        if (reply.type === 'progress') onProgress?.(reply.data);
        else result = reply;
      }
    });
    sock.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED') reject(new CliError(`no pcache server is running for ${cacheDev}`));
      else reject(new CliError(`control socket ${path}: ${err.message}`));
    });
    sock.on('close', () => {
      if (result) resolve(result);
      else reject(new CliError(`the pcache server for ${cacheDev} closed the control connection without an answer`));
    });
  });
}
