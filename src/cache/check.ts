import {
  dataOffset,
  describeKey,
  FormatError,
  flagsDataCrc,
  flagsInitDone,
  formatPosition,
  hex32,
  KEY_FLAG_CLEAN,
  KSET_HEADER_SIZE,
  KSET_KEYS_MAX,
  ksetSize,
  pcacheCrc,
  samePosition,
  SB_OFF,
  SB_SIZE,
  SEG_DATA_SIZE,
  superblockBlank,
  validateKey,
  type Key,
  type Position,
} from '../format/index.js';
import type { Medium } from '../media/medium.js';
import { readKset, walkLog } from './log.js';
import { loadMeta, type CacheMeta } from './meta.js';

export interface CheckOptions {
  /** The backing device's size in bytes; keys reaching past it are problems. Unknown: not checked. */
  backingSize?: number;
  /** Stop listing problems after this many (a forged log could otherwise name millions). */
  maxProblems?: number;
  /** Called after each kset with the bytes read so far (log and, with data_crc, key data). */
  onProgress?: (p: CheckProgress) => void;
}

export interface CheckProgress {
  /** Log bytes and key data bytes read so far. */
  bytesRead: number;
  ksets: number;
  keys: number;
}

export interface CheckReport {
  device: string;
  deviceSize: number;
  /** Segments the superblock declares; null when the superblock is unusable. */
  segNum: number | null;
  /** Cache segments (cache_info n_segs); 0 when unknown. */
  segments: number;
  /** Segments holding the log or data of a non-stale key. */
  usedSegments: number;
  dataCrc: boolean | null;
  keyTail: Position | null;
  dirtyTail: Position | null;
  /** Where the log ends: the next kset would be written here. */
  keyHead: Position | null;
  /** Why the log ends at keyHead. */
  logEnd: string | null;
  /** Bytes of all ksets from key_tail to key_head, LAST ksets included. */
  logBytes: number;
  /** Ksets from key_tail to key_head, LAST ksets included. */
  ksets: number;
  lastKsets: number;
  /** Every key in those ksets, stale ones included. */
  keys: number;
  /** Keys older than their segment's generation: dead, and not errors. */
  staleKeys: number;
  /** Keys without CLEAN at or after dirty_tail: not yet on the backing device. */
  dirtyKeys: number;
  dirtyBytes: number;
  /** Keys flagged CLEAN (filled from the backing device). */
  cleanKeys: number;
  /** Keys whose data was read and matched its data_crc. */
  dataCrcVerified: number;
  problems: string[];
  warnings: string[];
  clean: boolean;
}

const DEFAULT_MAX_PROBLEMS = 1000;

function emptyReport(medium: Medium): CheckReport {
  return {
    device: medium.path,
    deviceSize: medium.size(),
    segNum: null,
    segments: 0,
    usedSegments: 0,
    dataCrc: null,
    keyTail: null,
    dirtyTail: null,
    keyHead: null,
    logEnd: null,
    logBytes: 0,
    ksets: 0,
    lastKsets: 0,
    keys: 0,
    staleKeys: 0,
    dirtyKeys: 0,
    dirtyBytes: 0,
    cleanKeys: 0,
    dataCrcVerified: 0,
    problems: [],
    warnings: [],
    clean: false,
  };
}

function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/**
 * Validate everything reachable on a cache device: the records outside the log, the order of the
 * tails, every kset from key_tail to the end of the log, its keys, and their data CRCs. Never
 * throws: whatever goes wrong, including an I/O error, ends up in the report's problems.
 */
export async function checkCache(medium: Medium, opts: CheckOptions = {}): Promise<CheckReport> {
  const report = emptyReport(medium);
  const max = opts.maxProblems ?? DEFAULT_MAX_PROBLEMS;
  let suppressed = 0;
  let unsaid = 0;
  const problem = (msg: string): void => {
    if (report.problems.length < max) report.problems.push(msg);
    else suppressed++;
  };
  const warn = (msg: string): void => {
    if (report.warnings.length < max) report.warnings.push(msg);
    else unsaid++;
  };
  try {
    await runCheck(medium, opts, report, problem, warn);
  } catch (err) {
    problem(`check stopped: ${messageOf(err)}`);
  }
  if (suppressed > 0) report.problems.push(`... and ${suppressed} more problems`);
  if (unsaid > 0) report.warnings.push(`... and ${unsaid} more warnings`);
  report.clean = report.problems.length === 0;
  return report;
}

type Say = (msg: string) => void;

async function runCheck(medium: Medium, opts: CheckOptions, report: CheckReport, problem: Say, warn: Say): Promise<void> {
  if (opts.backingSize !== undefined && !(Number.isSafeInteger(opts.backingSize) && opts.backingSize >= 0)) {
    problem(`backing size ${opts.backingSize} is not a byte count`);
    return;
  }
  if (report.deviceSize >= SB_OFF + SB_SIZE) {
    const raw = Buffer.alloc(SB_SIZE);
    await medium.read(raw, SB_OFF);
    if (superblockBlank(raw)) {
      problem('superblock: magic is 0: the device is not formatted');
      return;
    }
  }
  const meta = await loadMeta(medium);
  if (meta instanceof FormatError) {
    problem(meta.message);
    return;
  }
  report.segNum = meta.sb.segNum;
  report.segments = meta.cacheInfo.nSegs;
  report.dataCrc = flagsDataCrc(meta.cacheInfo.flags);
  report.keyTail = { seg: meta.keyTail.seg, off: meta.keyTail.off };
  report.dirtyTail = { seg: meta.dirtyTail.seg, off: meta.dirtyTail.off };
  meta.warnings.forEach(warn);
  if (!flagsInitDone(meta.cacheInfo.flags)) {
    warn('cache_info: INIT_DONE is clear: dm-pcache would start this cache empty, ignoring the tails and the log');
  }
  await checkLog(medium, meta, opts, report, problem, warn);
}

/**
 * A torn last write leaves a damaged kset with nothing valid after it. If the damaged kset's own
 * header still gives its size and a valid kset sits right behind it, the log was damaged in the
 * middle instead (as when a byte of an old kset changes): returns that kset's position.
 */
async function validKsetAfter(medium: Medium, physOf: readonly number[], at: Position): Promise<Position | null> {
  const head = Buffer.alloc(KSET_HEADER_SIZE);
  await medium.read(head, dataOffset(physOf[at.seg]!, at.off));
  if (head.readBigUInt64LE(16) !== 0n) return null;
  const keyNum = head.readUInt32LE(4);
  if (keyNum === 0 || keyNum > KSET_KEYS_MAX) return null;
  const next = { seg: at.seg, off: at.off + ksetSize(keyNum) };
  if (next.off + KSET_HEADER_SIZE > SEG_DATA_SIZE) return null;
  const kset = await readKset(medium, physOf, next);
  return kset instanceof FormatError ? null : next;
}

async function headerKeyNum(medium: Medium, physOf: readonly number[], at: Position): Promise<number> {
  const head = Buffer.alloc(8);
  await medium.read(head, dataOffset(physOf[at.seg]!, at.off));
  return head.readUInt32LE(4);
}

async function checkLog(
  medium: Medium,
  meta: CacheMeta,
  opts: CheckOptions,
  report: CheckReport,
  problem: Say,
  warn: Say,
): Promise<void> {
  const nSegs = meta.cacheInfo.nSegs;
  const dataCrc = report.dataCrc === true;
  const used = new Set<number>();
  let dirtyMet = false;
  let dataBytesRead = 0;

  const checkKey = async (where: string, key: Key): Promise<void> => {
    const bad = validateKey(key, { nSegs, backingSize: opts.backingSize });
    if (bad) {
      problem(`${where}: ${bad.message}`);
      return;
    }
    const gen = meta.gens[key.seg]!;
    if (key.gen < gen) {
      report.staleKeys++;
      return;
    }
    if (key.gen > gen) {
      warn(`${where}: ${describeKey(key)}: generation ${key.gen} is newer than its segment's (${gen})`);
    }
    used.add(key.seg);
    if (key.flags & KEY_FLAG_CLEAN) report.cleanKeys++;
    else if (dirtyMet) {
      report.dirtyKeys++;
      report.dirtyBytes += key.len;
    }
    if (!dataCrc) return;
    // validateKey bounded seg and the range, so this read stays inside the segment's data area.
    const data = Buffer.allocUnsafe(key.len);
    await medium.read(data, dataOffset(meta.physOf[key.seg]!, key.segOff));
    dataBytesRead += key.len;
    const crc = pcacheCrc(data);
    if (crc !== key.dataCrc) {
      problem(`${where}: ${describeKey(key)}: data_crc mismatch (stored 0x${hex32(key.dataCrc)}, data has 0x${hex32(crc)})`);
    } else {
      report.dataCrcVerified++;
    }
  };

  const end = await walkLog(medium, meta.physOf, meta.keyTail, async (pos, kset) => {
    if (samePosition(pos, meta.dirtyTail)) dirtyMet = true;
    report.ksets++;
    report.logBytes += kset.size;
    if (kset.last) report.lastKsets++;
    else {
      for (let i = 0; i < kset.keys.length; i++) {
        report.keys++;
        await checkKey(`kset at ${formatPosition(pos)} key ${i}`, kset.keys[i]!);
      }
    }
    opts.onProgress?.({ bytesRead: report.logBytes + dataBytesRead, ksets: report.ksets, keys: report.keys });
  });

  report.keyHead = { seg: end.head.seg, off: end.head.off };
  const at = formatPosition(end.head);
  switch (end.reason.problem) {
    case 'bad-magic':
      report.logEnd = `no kset magic at ${at}`;
      break;
    case 'bad-crc': {
      report.logEnd = `damaged kset at ${at}`;
      const after = await validKsetAfter(medium, meta.physOf, end.head);
      if (after) {
        problem(
          `log at ${at}: ${end.reason.message}, yet a valid kset follows at ${formatPosition(after)}: ` +
            'damage inside the log, not a torn last write; replay stops here and loses what follows',
        );
      } else {
        warn(`log ends at a damaged kset at ${at}: possibly a torn write (${end.reason.message})`);
      }
      break;
    }
    default: {
      report.logEnd = `invalid kset at ${at}`;
      // A kset header that straddles a sector boundary may be torn into its new magic and the zeros
      // it overwrote (the previous kset's trailer): key_num 0 at the end of the log is that.
      if (end.reason.problem === 'bad-key-num' && (await headerKeyNum(medium, meta.physOf, end.head)) === 0) {
        warn(`log ends at a kset header with key_num 0 at ${at}: possibly a torn write (${end.reason.message})`);
        break;
      }
      problem(`log at ${at}: ${end.reason.message}`);
    }
  }
  for (const s of end.segments) used.add(s);
  report.usedSegments = used.size;

  if (!dirtyMet && !samePosition(meta.dirtyTail, end.head)) {
    problem(
      `dirty_tail ${formatPosition(meta.dirtyTail)} is not at a kset of the log between key_tail ` +
        `${formatPosition(meta.keyTail)} and key_head ${at}`,
    );
  }
}
