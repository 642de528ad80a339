import type { BackingDevice } from '../backing/backing.js';
import type { Medium } from '../media/medium.js';
import type { DataHead } from './data-head.js';
import type { DataWriter } from './data-writer.js';
import type { FillGate } from './fill.js';
import type { KeyIndex } from './key-index.js';
import type { KsetLog } from './kset-log.js';
import type { Segments } from './segments.js';

/** The counters a user of a storage system expects, beside dm-pcache's status fields. */
export interface Counters {
  reads: number;
  readBytes: number;
  readHits: number;
  readHitBytes: number;
  readMisses: number;
  readMissBytes: number;
  fillBytes: number;
  /** Missed bytes not filled because fill work was behind (the backlog was full). */
  fillDroppedBytes: number;
  /** Missed bytes not filled because their read stream was past the sequential cutoff. */
  sequentialSkippedBytes: number;
  writes: number;
  writeBytes: number;
  fuaWrites: number;
  zeroWrites: number;
  zeroBytes: number;
  flushes: number;
  /** Bytes of dirty keys logged or open and not yet written back. */
  dirtyBytes: number;
  writtenBackBytes: number;
  writtenBackKsets: number;
  writebackErrors: number;
  gcRuns: number;
  gcKsets: number;
  segmentsFreed: number;
  staleKeysDropped: number;
  writesWaiting: number;
  spaceWaits: number;
  /** Bytes of cache data write-back holds now: read ahead, or on their way to the backing device. */
  writebackBytesHeld: number;
  /** Ksets write-back has decoded (or is decoding) ahead of the one it writes back. */
  writebackKsetsAhead: number;
}

export function newCounters(): Counters {
  return {
    reads: 0,
    readBytes: 0,
    readHits: 0,
    readHitBytes: 0,
    readMisses: 0,
    readMissBytes: 0,
    fillBytes: 0,
    fillDroppedBytes: 0,
    sequentialSkippedBytes: 0,
    writes: 0,
    writeBytes: 0,
    fuaWrites: 0,
    zeroWrites: 0,
    zeroBytes: 0,
    flushes: 0,
    dirtyBytes: 0,
    writtenBackBytes: 0,
    writtenBackKsets: 0,
    writebackErrors: 0,
    gcRuns: 0,
    gcKsets: 0,
    segmentsFreed: 0,
    staleKeysDropped: 0,
    writesWaiting: 0,
    spaceWaits: 0,
    writebackBytesHeld: 0,
    writebackKsetsAhead: 0,
  };
}

/** Free segments kept back from data so the log can always move to a new segment. */
export const LOG_RESERVE = 1;
/** Miss fills are best effort: they never take the last free segments from writes. */
export const FILL_RESERVE = 3;

/** The state the read, write, GC and write-back paths share. */
export interface CacheCore {
  readonly medium: Medium;
  readonly backing: BackingDevice;
  readonly physOf: readonly number[];
  readonly dataCrc: boolean;
  readonly backingSize: number;
  readonly segments: Segments;
  readonly index: KeyIndex;
  readonly log: KsetLog;
  readonly head: DataHead;
  /** Data writes to the cache device, gathered into vectored writes. */
  readonly data: DataWriter;
  readonly stats: Counters;
  /** Which misses are filled, and the queue of fill work. */
  readonly fills: FillGate;
  /** Ask GC and write-back to make room now (a write is waiting for a segment). */
  needSpace(): void;
  /** Keep track of background work (fills) that close() must wait for. */
  track(p: Promise<unknown>): void;
}
