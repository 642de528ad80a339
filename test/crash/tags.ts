/**
 * Self-describing sector contents. Every 512-byte sector a test writes carries its own byte offset
 * and the id of the write that put it there, and the rest of the sector is a pattern derived from
 * both, so that a read tells exactly which write (if any) it returns: never garbage, never another
 * sector's data, never a torn sector, without keeping the data itself.
 */
export const SECTOR = 512;
const MAGIC = 0x31544350; // 'PCT1'

/** What a sector holds. */
export type SectorValue = { kind: 'tag'; id: number } | { kind: 'zero' } | { kind: 'garbage'; why: string };

/**
 * Write the tag of write `id` for the sector at byte offset `off` into `buf` at `at`: a 16-byte
 * header (magic, id, offset) repeated over the whole sector, so that one native compare of the
 * sector against itself shifted by 16 bytes proves the body intact.
 */
export function tagSector(buf: Buffer, at: number, off: number, id: number): void {
  buf.writeUInt32LE(MAGIC, at);
  buf.writeUInt32LE(id >>> 0, at + 4);
  buf.writeUInt32LE(off % 2 ** 32, at + 8);
  buf.writeUInt32LE(Math.floor(off / 2 ** 32), at + 12);
  for (let n = 16; n < SECTOR; n *= 2) buf.copyWithin(at + n, at, at + n);
}

/** The data of write `id` covering [off, off+len) (sector-aligned). */
export function tagData(off: number, len: number, id: number): Buffer {
  const buf = Buffer.allocUnsafe(len);
  for (let s = 0; s < len; s += SECTOR) tagSector(buf, s, off + s, id);
  return buf;
}

const ZERO = Buffer.alloc(SECTOR);

function allZero(buf: Buffer, at: number): boolean {
  return ZERO.compare(buf, at, at + SECTOR) === 0;
}

/** What the sector at `buf[at..at+512)` holds, read from device offset `off`. */
export function readSector(buf: Buffer, at: number, off: number): SectorValue {
  if (buf.readUInt32LE(at) !== MAGIC) {
    return allZero(buf, at) ? { kind: 'zero' } : { kind: 'garbage', why: `no tag (first word 0x${buf.readUInt32LE(at).toString(16)})` };
  }
  const id = buf.readUInt32LE(at + 4);
  const tagOff = buf.readUInt32LE(at + 8) + buf.readUInt32LE(at + 12) * 2 ** 32;
  if (tagOff !== off) return { kind: 'garbage', why: `the data of sector ${tagOff / SECTOR} (write ${id})` };
  if (buf.compare(buf, at, at + SECTOR - 16, at + 16, at + SECTOR) !== 0) return { kind: 'garbage', why: `write ${id}'s tag with a damaged body` };
  return { kind: 'tag', id };
}
