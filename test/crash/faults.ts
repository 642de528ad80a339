/**
 * A small model for fault tests: per sector, the values it may hold. A write that succeeded leaves
 * exactly its value; one that failed leaves the old value or the new one (pieces of a write land
 * separately); a read that succeeded pins what it saw. Every value is a tag (tags.ts), so a read
 * also proves it returned no garbage and no other sector's data.
 */
import assert from 'node:assert/strict';
import { CacheError } from '../../src/cache/errors.js';
import { readSector, SECTOR } from './tags.js';

export class PossibleValues {
  /** Per sector: the ids it may hold (0: initial content); absent means exactly {0}. */
  private readonly sets = new Map<number, Set<number>>();
  /** Ids of zeroing writes (they read as zeros). */
  private readonly zeroIds = new Set<number>();
  nextId = 1;

  wrote(off: number, len: number, id: number, ok: boolean, zero = false): void {
    if (zero) this.zeroIds.add(id);
    for (let s = off / SECTOR; s < (off + len) / SECTOR; s++) {
      if (ok) this.sets.set(s, new Set([id]));
      else this.of(s).add(id);
    }
  }

  of(s: number): Set<number> {
    let v = this.sets.get(s);
    if (!v) this.sets.set(s, (v = new Set([0])));
    return v;
  }

  /** Check a successful read of [off, off+len) and pin what it returned. */
  readBack(off: number, buf: Buffer, what: string): void {
    for (let i = 0; i < buf.length / SECTOR; i++) {
      const s = off / SECTOR + i;
      const v = readSector(buf, i * SECTOR, off + i * SECTOR);
      const allowed = this.of(s);
      let id: number | undefined;
      if (v.kind === 'tag' && allowed.has(v.id)) id = v.id;
      if (v.kind === 'zero') id = [...allowed].find((x) => this.zeroIds.has(x));
      if (id === undefined) {
        const got = v.kind === 'tag' ? `write ${v.id}` : v.kind === 'zero' ? 'zeros' : `garbage (${v.why})`;
        assert.fail(`${what}: sector ${s} reads ${got}; allowed: ${[...allowed].join(', ')}`);
      }
      this.sets.set(s, new Set([id]));
    }
  }

  /** Sectors whose value is not yet known exactly. */
  uncertain(): number[] {
    return [...this.sets].filter(([, v]) => v.size > 1).map(([s]) => s);
  }

  written(): number[] {
    return [...this.sets.keys()];
  }

  exact(s: number): number | undefined {
    const v = this.of(s);
    return v.size === 1 ? [...v][0] : undefined;
  }

  isZero(id: number): boolean {
    return this.zeroIds.has(id);
  }
}

/**
 * A failed request must fail with EIO: a CacheError, or the device's own errno error (a flush
 * passes the medium's error through; the NBD server maps either by its code). Never a TypeError,
 * a RangeError or an error without a code.
 */
export function assertIoError(err: unknown, what: string): void {
  assert.ok(err instanceof Error, `${what}: rejected with ${String(err)}`);
  assert.ok(!(err instanceof TypeError) && !(err instanceof RangeError), `${what}: rejected with ${err.stack}`);
  assert.equal((err as { code?: unknown }).code, 'EIO', `${what}: rejected with ${err instanceof CacheError ? 'CacheError ' : ''}${err.stack}`);
}

/** Runs of consecutive sectors, at most `max` long. */
export function sectorRuns(sectors: number[], max = 256): Array<{ off: number; len: number }> {
  sectors.sort((a, b) => a - b);
  const out: Array<{ off: number; len: number }> = [];
  for (const s of sectors) {
    const last = out[out.length - 1];
    if (last && last.off + last.len === s * SECTOR && last.len < max * SECTOR) last.len += SECTOR;
    else if (!last || s * SECTOR >= last.off + last.len) out.push({ off: s * SECTOR, len: SECTOR });
  }
  return out;
}
