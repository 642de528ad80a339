import { formatPosition, type Position } from '../format/index.js';
import type { Counters } from './core.js';
import type { FailureNote } from './failures.js';

/** dm-pcache's status fields, in its order, plus our counters. */
export interface CacheStatus {
  sbFlags: number;
  segNum: number;
  nSegs: number;
  segsUsed: number;
  gcPercent: number;
  cacheFlags: number;
  keyHead: Position;
  dirtyTail: Position;
  keyTail: Position;
  dataCrc: boolean;
  cacheMode: string;
  /** Bytes of logged keys not yet written back (estimated from the log distance). */
  dirtyBytes: number;
  indexKeys: number;
  openKeys: number;
  writebackError: string | null;
  gcError: string | null;
  /** The last write-back failure since open, kept after write-back recovers (writebackError clears). */
  writebackLastError: FailureNote | null;
  gcLastError: FailureNote | null;
  /** pcache extension: read streams longer than this are not filled (0: no cutoff). */
  sequentialCutoff: number;
  /** Bytes of miss fills admitted and not yet written into the cache. */
  fillBacklogBytes: number;
  counters: Counters;
}

/** The line `dmsetup status` prints after `0 <sectors> pcache`. */
export function statusFields(s: CacheStatus): string {
  return [
    s.sbFlags.toString(16),
    s.segNum,
    s.nSegs,
    s.segsUsed,
    s.gcPercent,
    s.cacheFlags.toString(16),
    formatPosition(s.keyHead),
    formatPosition(s.dirtyTail),
    formatPosition(s.keyTail),
  ].join(' ');
}
