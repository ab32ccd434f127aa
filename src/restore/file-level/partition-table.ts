import { SnapshiftError } from '../../core/errors.ts';
import type { ReadDiskBytes } from './disk-bytes.ts';

/** One partition as its table describes it. */
export interface Partition {
  /** 1-based: the GPT entry's index, the MBR slot (1–4), or 5 and up for logical partitions in MBR order. */
  number: number;
  startBytes: number;
  sizeBytes: number;
  /** The GPT type GUID (upper case) or the MBR type byte as two hex digits ("83"). */
  type: string;
  /** The GPT partition name; "" for MBR. */
  name: string;
}

export interface PartitionTable {
  scheme: 'gpt' | 'mbr' | 'none';
  sectorBytes: number;
  partitions: Partition[];
}

const gptSignature = 'EFI PART';
/** MBR types of extended partitions, whose logical partitions follow a chain of EBRs (CHS, LBA, Linux). */
const extendedTypes = new Set([0x05, 0x0f, 0x85]);
const protectiveMbrType = 0xee;
/** At most this many logical partitions are followed: a looping EBR chain must not loop us. */
const maxLogicalPartitions = 128;

/**
 * The partition table of a disk: GPT (UEFI 2.10 § 5.3, header and entry array checked by their CRC32,
 * the backup header at the disk's last LBA when the primary is damaged), else MBR with its extended
 * partition's logical ones (each EBR: entry 1 the logical partition relative to itself, entry 2 the next EBR
 * relative to the extended partition), else none (a filesystem on the whole disk, or nothing).
 */
export async function readPartitionTable(read: ReadDiskBytes, diskBytes: number, diskName: string): Promise<PartitionTable> {
  const mbr = await read(0, 512);
  const hasMbrSignature = mbr.readUInt16LE(510) === 0xaa55;
  const slots = hasMbrSignature ? mbrSlots(mbr) : [];
  // A GPT disk carries a protective MBR (type 0xEE); sector size 512 first, then 4096 (4Kn disks).
  if (slots.some((slot) => slot.type === protectiveMbrType) || !hasMbrSignature) {
    for (const sectorBytes of [512, 4096]) {
      const gpt = await readGpt(read, diskBytes, sectorBytes, diskName);
      if (gpt) return { scheme: 'gpt', sectorBytes, partitions: gpt };
    }
    if (hasMbrSignature) {
      throw new SnapshiftError('FILES_PARTITION_TABLE_BAD', `disk ${diskName} has a protective MBR but neither GPT header (primary nor backup) is valid: its partitions cannot be found`);
    }
    return { scheme: 'none', sectorBytes: 512, partitions: [] };
  }
  const sane = slots.filter((slot) => slot.type !== 0 && slot.sectors > 0);
  const fits = sane.every((slot) => (slot.startLba + slot.sectors) * 512 <= diskBytes && (slot.status === 0 || slot.status === 0x80));
  // 0x55AA alone is no MBR: a FAT boot sector carries it too. Without one sane entry, take no table.
  if (sane.length === 0 || !fits) return { scheme: 'none', sectorBytes: 512, partitions: [] };
  const partitions: Partition[] = [];
  for (const slot of sane) {
    if (extendedTypes.has(slot.type)) {
      partitions.push(...(await readLogicalPartitions(read, diskBytes, slot.startLba, slot.sectors)));
      continue;
    }
    partitions.push({ number: slot.index + 1, startBytes: slot.startLba * 512, sizeBytes: slot.sectors * 512, type: hex2(slot.type), name: '' });
  }
  partitions.sort((a, b) => a.number - b.number);
  return { scheme: 'mbr', sectorBytes: 512, partitions };
}

interface MbrSlot {
  index: number;
  status: number;
  type: number;
  startLba: number;
  sectors: number;
}

/** The four 16-byte entries at offset 446: status, CHS (ignored), type, first LBA, sector count. */
function mbrSlots(sector: Buffer): MbrSlot[] {
  return [0, 1, 2, 3].map((index) => {
    const at = 446 + index * 16;
    return { index, status: sector[at]!, type: sector[at + 4]!, startLba: sector.readUInt32LE(at + 8), sectors: sector.readUInt32LE(at + 12) };
  });
}

async function readLogicalPartitions(read: ReadDiskBytes, diskBytes: number, extendedLba: number, extendedSectors: number): Promise<Partition[]> {
  const partitions: Partition[] = [];
  const seen = new Set<number>();
  let ebrLba = extendedLba;
  while (partitions.length < maxLogicalPartitions && !seen.has(ebrLba) && ebrLba < extendedLba + extendedSectors) {
    seen.add(ebrLba);
    const ebr = await read(ebrLba * 512, 512);
    if (ebr.readUInt16LE(510) !== 0xaa55) break;
    const [logical, next] = mbrSlots(ebr);
    if (logical && logical.type !== 0 && logical.sectors > 0 && (ebrLba + logical.startLba + logical.sectors) * 512 <= diskBytes) {
      partitions.push({ number: 5 + partitions.length, startBytes: (ebrLba + logical.startLba) * 512, sizeBytes: logical.sectors * 512, type: hex2(logical.type), name: '' });
    }
    if (!next || next.type === 0 || next.startLba === 0) break;
    ebrLba = extendedLba + next.startLba;
  }
  return partitions;
}

/** The GPT's partitions, or undefined when neither header (at LBA 1, or the backup at the last LBA) is valid. */
async function readGpt(read: ReadDiskBytes, diskBytes: number, sectorBytes: number, diskName: string): Promise<Partition[] | undefined> {
  const lastLba = Math.floor(diskBytes / sectorBytes) - 1;
  for (const headerLba of [1, lastLba]) {
    if (headerLba < 1) continue;
    const header = await read(headerLba * sectorBytes, sectorBytes);
    if (header.toString('latin1', 0, 8) !== gptSignature) continue;
    const headerSize = header.readUInt32LE(12);
    if (headerSize < 92 || headerSize > sectorBytes) continue;
    const copy = Buffer.from(header.subarray(0, headerSize));
    const storedCrc = copy.readUInt32LE(16);
    copy.writeUInt32LE(0, 16);
    if (crc32(copy) !== storedCrc) continue;
    const entriesLba = Number(header.readBigUInt64LE(72));
    const entryCount = header.readUInt32LE(80);
    const entryBytes = header.readUInt32LE(84);
    if (entryBytes < 128 || entryCount > 4096 || (entriesLba + 1) * sectorBytes > diskBytes) continue;
    const entries = await read(entriesLba * sectorBytes, entryCount * entryBytes);
    if (crc32(entries) !== header.readUInt32LE(88)) continue;
    const partitions: Partition[] = [];
    for (let index = 0; index < entryCount; index++) {
      const entry = entries.subarray(index * entryBytes, (index + 1) * entryBytes);
      const type = guidText(entry.subarray(0, 16));
      if (type === '00000000-0000-0000-0000-000000000000') continue;
      const firstLba = Number(entry.readBigUInt64LE(32));
      const lastEntryLba = Number(entry.readBigUInt64LE(40));
      if (lastEntryLba < firstLba || (lastEntryLba + 1) * sectorBytes > diskBytes) {
        throw new SnapshiftError('FILES_PARTITION_TABLE_BAD', `disk ${diskName}: GPT entry ${index + 1} spans LBA ${firstLba}–${lastEntryLba}, outside the disk (${diskBytes} bytes)`);
      }
      const name = entry.subarray(56, 128).toString('utf16le').replace(/\0.*$/s, '');
      partitions.push({ number: index + 1, startBytes: firstLba * sectorBytes, sizeBytes: (lastEntryLba - firstLba + 1) * sectorBytes, type, name });
    }
    return partitions;
  }
  return undefined;
}

/** A GUID as text: the first three fields are stored little-endian (UEFI 2.10 appendix A). */
function guidText(bytes: Buffer): string {
  const hex = (from: number, to: number, reverse: boolean) => {
    const part = Buffer.from(bytes.subarray(from, to));
    return (reverse ? part.reverse() : part).toString('hex');
  };
  return [hex(0, 4, true), hex(4, 6, true), hex(6, 8, true), hex(8, 10, false), hex(10, 16, false)].join('-').toUpperCase();
}

function hex2(value: number): string {
  return value.toString(16).padStart(2, '0');
}

let crcTable: Uint32Array | undefined;

/** CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as GPT uses; Node 20's zlib has none. */
export function crc32(bytes: Buffer): number {
  crcTable ??= Uint32Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  let crc = 0xffffffff;
  for (const byte of bytes) crc = crcTable[(crc ^ byte) & 0xff]! ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}
