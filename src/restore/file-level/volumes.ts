import { posix } from 'node:path';
import { SnapshiftError } from '../../core/errors.ts';
import type { ReadDiskBytes } from './disk-bytes.ts';
import { probeFilesystem, type FilesystemProbe } from './filesystem-probe.ts';
import { readPartitionTable } from './partition-table.ts';

/** A place a filesystem may live: a partition, or a whole disk without a partition table. */
export interface Volume {
  /** The first component of paths into it: `vda1`, `disk0p1` (a disk name ending in a digit takes a "p"), or `vda` (whole disk). */
  name: string;
  disk: string;
  /** The partition's number, or null for a whole disk. */
  partition: number | null;
  scheme: 'gpt' | 'mbr' | 'none';
  startBytes: number;
  sizeBytes: number;
  /** GPT type GUID or MBR type byte (hex); null for a whole disk. */
  partitionType: string | null;
  /** GPT partition name ("" for MBR and whole disks). */
  partitionName: string;
  filesystem: FilesystemProbe;
}

export interface DiskToScan {
  name: string;
  sizeBytes: number;
  read: ReadDiskBytes;
}

/** The volumes of each disk, in disk order then partition order (reads only partition tables and superblocks). */
export async function findVolumes(disks: readonly DiskToScan[]): Promise<Volume[]> {
  const volumes: Volume[] = [];
  for (const disk of disks) {
    const table = await readPartitionTable(disk.read, disk.sizeBytes, disk.name);
    if (table.scheme === 'none') {
      volumes.push({
        name: disk.name,
        disk: disk.name,
        partition: null,
        scheme: 'none',
        startBytes: 0,
        sizeBytes: disk.sizeBytes,
        partitionType: null,
        partitionName: '',
        filesystem: await probeFilesystem(disk.read, 0, disk.sizeBytes),
      });
      continue;
    }
    for (const partition of table.partitions) {
      volumes.push({
        name: partitionVolumeName(disk.name, partition.number),
        disk: disk.name,
        partition: partition.number,
        scheme: table.scheme,
        startBytes: partition.startBytes,
        sizeBytes: partition.sizeBytes,
        partitionType: partition.type,
        partitionName: partition.name,
        filesystem: await probeFilesystem(disk.read, partition.startBytes, partition.sizeBytes),
      });
    }
  }
  return volumes;
}

/** Linux's own naming: vda + 1 = vda1, nvme0n1 + 1 = nvme0n1p1. */
export function partitionVolumeName(diskName: string, partition: number): string {
  return `${diskName}${/\d$/.test(diskName) ? 'p' : ''}${partition}`;
}

/** A path as `files` takes it: `/VOLUME/inside/the/filesystem`. */
export interface GuestPath {
  /** Normalised, absolute: "/vda1/etc/hostname", or "/" for the list of volumes. */
  path: string;
  volume: Volume | undefined;
  /** The components inside the volume ("" for its root), still to be resolved against its symlinks. */
  inner: string;
  /** A trailing slash asks for what a final symlink points to, as in a shell. */
  followLast: boolean;
}

/** Splits a user's path into its volume and the path inside it; FILES_NO_SUCH_VOLUME when no volume has that name. */
export function parseGuestPath(path: string, volumes: readonly Volume[]): GuestPath {
  if (path.includes('\0')) throw new SnapshiftError('USAGE', 'a path cannot contain a NUL byte');
  const normalised = posix.normalize(`/${path}`);
  const followLast = path.endsWith('/') || path.endsWith('/.');
  const [volumeName = '', ...rest] = normalised.split('/').filter((component) => component !== '');
  if (volumeName === '') return { path: '/', volume: undefined, inner: '', followLast };
  const volume = volumes.find((candidate) => candidate.name === volumeName);
  if (!volume) {
    const known = volumes.map((candidate) => `/${candidate.name}`).join(', ') || 'none';
    throw new SnapshiftError('FILES_NO_SUCH_VOLUME', `no disk or partition "${volumeName}" in this restore point (paths start with one of: ${known}; "snapshift files ls VM" lists them)`);
  }
  return { path: normalised.replace(/\/$/, '') || '/', volume, inner: rest.join('/'), followLast };
}
