import { basename, dirname, extname, join } from 'node:path';

/**
 * Names of what the libvirt adapter creates, each carrying the session tag (`snapshift-<tag>-…`), so the
 * hunter can tell a crashed session's leftovers from a live one's: libvirt keeps no owner for them.
 */

/** The NBD socket of a pull-mode backup job: `fleece` serves a fleecing, `cbt` only a changed-block query. */
export function backupSocketPath(runDir: string, tag: string, purpose: 'fleece' | 'cbt'): string {
  return join(runDir, `snapshift-${tag}-${purpose}.sock`);
}

/** A backup job's scratch file for one disk (libvirt creates it and deletes it when the job ends). */
export function scratchPath(folder: string, imagePath: string, tag: string, diskName: string): string {
  const stem = basename(imagePath, extname(imagePath)).replace(/[^A-Za-z0-9._-]/g, '_');
  return join(folder, `${stem}-snapshift-${tag}-${diskName}.scratch.qcow2`);
}

/** The folder a disk's scratch file goes to: the given one, or beside a file image. */
export function scratchFolderOf(imagePath: string, protocol: string, folder: string | undefined, fallback: string): string {
  return folder ?? (protocol === 'file' ? dirname(imagePath) : fallback);
}

/** The session tag in one of our socket or scratch names, or undefined when the name is not ours. */
export function tagInName(path: string): string | undefined {
  return /snapshift-([0-9a-f]{8})-(?:fleece\.sock|cbt\.sock|[^/]*\.scratch\.qcow2)$/.exec(path)?.[1];
}

/** A checkpoint of a repository's chain: `snapshift-<chainKey>-<tag>` (the chain key as in QEMU bitmap names). */
export function checkpointNameFor(chainKey: string, tag: string): string {
  return `snapshift-${chainKey}-${tag}`;
}

/** The chain key of one of our checkpoints, or undefined for a checkpoint that is not ours. */
export function chainKeyOfCheckpoint(name: string): string | undefined {
  return /^snapshift-([0-9a-f]{16})-[0-9a-f]{8}$/.exec(name)?.[1];
}
