/**
 * Clients that misbehave on purpose, for the resource-bound tests: ones that pipeline large
 * reads and never read a reply, and ones that connect and say nothing.
 */
import { readFileSync } from 'node:fs';
import net from 'node:net';
import {
  NBD_CMD_READ,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_OPT_EXPORT_NAME,
  encodeClientFlags,
  encodeOption,
  encodeRequestHeader,
} from '../../src/nbd/protocol.js';

export type Address = { path: string } | { host: string; port: number };

function connect(addr: Address): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(addr);
    s.once('connect', () => {
      s.off('error', reject);
      resolve(s);
    });
    s.once('error', reject);
  });
}

/**
 * Enters transmission with EXPORT_NAME (greeting 18 bytes, export reply 10 bytes with
 * NO_ZEROES), then sends `count` READs of `length` bytes and stops reading the socket for good.
 */
export async function nonReadingClient(addr: Address, count: number, length: number): Promise<net.Socket> {
  const s = await connect(addr);
  s.on('error', () => {});
  let got = 0;
  await new Promise<void>((resolve, reject) => {
    const onData = (d: Buffer): void => {
      const before = got;
      got += d.length;
      if (before < 18 && got >= 18) {
        s.write(encodeClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES));
        s.write(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.alloc(0)));
      }
      if (got >= 28) {
        s.off('data', onData);
        s.pause();
        resolve();
      }
    };
    s.on('data', onData);
    s.once('close', () => reject(new Error('server closed the connection during the handshake')));
  });
  for (let i = 0; i < count; i++) {
    s.write(encodeRequestHeader({ type: NBD_CMD_READ, flags: 0, handle: BigInt(i + 1), offset: (i * length) % (64 * 1024 * 1024), length }));
  }
  return s;
}

/** A connection that never sends a byte. Resolves `closed` when the server drops it. */
export async function silentClient(addr: Address): Promise<{ socket: net.Socket; closed: Promise<void> }> {
  const s = await connect(addr);
  s.on('error', () => {});
  s.on('data', () => {});
  return { socket: s, closed: new Promise((resolve) => s.once('close', () => resolve())) };
}

/** Resident set size of a process, in bytes (Linux). */
export function rssOf(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]) * 1024;
}
