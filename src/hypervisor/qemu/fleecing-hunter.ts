import { rm } from 'node:fs/promises';
import { basename } from 'node:path';
import { pathExists, pathsHeldOpen } from '../../core/fs-probe.ts';
import { blockNodeNames, fileChildOf, queryNamedBlockNodes } from './block-graph.ts';
import { fleeceNamePattern, fleeceNamesOf, fleeceScratchFilePattern, removeFleeceFromQemu, type FleeceScratch, type RemovedFleecing } from './qemu-fleecing.ts';
import type { QmpSession } from './qmp-session.ts';

/** What the hunter did about one session's leftover fleecing in one QEMU process. */
export interface LeftoverFleecing extends RemovedFleecing {
  tag: string;
  /** Scratch images QEMU had open under our name, deleted once QEMU let go of them. */
  scratchPaths: string[];
}

/**
 * Finds fleecing a killed task left in a QEMU process (exports, jobs and nodes named `snapshift-<tag>-fleece-…`)
 * and removes it, for every tag `isLiveTag` does not claim. The guest is never at risk: a scratch image holds
 * only old data, so dropping it loses nothing. Nothing without our name is touched. `dryRun`: only reports.
 */
export async function removeLeftoverFleecing(qmp: QmpSession, isLiveTag: (tag: string) => boolean, options: { dryRun?: boolean } = {}): Promise<LeftoverFleecing[]> {
  const indicesByTag = new Map<string, Set<number>>();
  const note = (name: string): void => {
    const match = fleeceNamePattern.exec(name);
    if (!match) return;
    const [, tag, index] = match as unknown as [string, string, string];
    if (isLiveTag(tag)) return;
    if (!indicesByTag.has(tag)) indicesByTag.set(tag, new Set());
    indicesByTag.get(tag)!.add(Number(index));
  };
  // An export's node may be our copy-before-write filter because the filter took the disk's place under the
  // guest's own export: that names the tag, and removeFleeceFromQemu leaves such an export alone.
  for (const entry of await qmp.execute<Array<{ id: string; 'node-name': string }>>('query-block-exports')) {
    note(entry.id);
    note(entry['node-name']);
  }
  for (const job of await qmp.execute<Array<{ device: string }>>('query-block-jobs')) note(job.device);
  for (const name of await blockNodeNames(qmp)) note(name);
  if (indicesByTag.size === 0) return [];

  // Where the scratch images are, read before their nodes go. From the protocol node under each scratch node:
  // a scratch given the disk as backing at run time reports a `json:{…}` file name itself.
  const scratchFiles = new Map<string, string>();
  const namedNodes = await queryNamedBlockNodes(qmp).catch(() => []);
  for (const node of namedNodes) {
    if (!fleeceNamePattern.test(node['node-name']) || node.drv !== 'qcow2') continue;
    const protocolNodeName = await fileChildOf(qmp, node['node-name']);
    const path = namedNodes.find((candidate) => candidate['node-name'] === protocolNodeName)?.file ?? node.file;
    if (fleeceScratchFilePattern.test(basename(path))) scratchFiles.set(node['node-name'], path);
  }
  const report: LeftoverFleecing[] = [];
  for (const [tag, indices] of indicesByTag) {
    const names = [...indices].sort((a, b) => a - b).map((index) => fleeceNamesOf(tag, index));
    const removed = await removeFleeceFromQemu(qmp, names, options);
    const scratchPaths: string[] = [];
    for (const { scratchNodeName } of names) {
      const path = scratchFiles.get(scratchNodeName);
      if (path === undefined) continue;
      if (!options.dryRun) await rm(path, { force: true });
      scratchPaths.push(path);
    }
    report.push({ tag, ...removed, scratchPaths });
  }
  return report;
}

/** What became of one scratch image of a ledger row. */
export interface ScratchFileRemoval {
  scratchPath: string;
  action: 'removed' | 'already-gone' | 'not-ours';
}

/**
 * Deletes the scratch images a fleecing ledger row names (run it after `removeLeftoverFleecing`, or when QEMU
 * is gone: then nobody holds them). A path whose file name is not one we give scratch images is left alone.
 */
export async function removeFleeceScratchFiles(scratch: readonly FleeceScratch[]): Promise<ScratchFileRemoval[]> {
  const removals: ScratchFileRemoval[] = [];
  for (const { scratchPath } of scratch) {
    if (!fleeceScratchFilePattern.test(basename(scratchPath))) {
      removals.push({ scratchPath, action: 'not-ours' });
    } else if (!(await pathExists(scratchPath))) {
      removals.push({ scratchPath, action: 'already-gone' });
    } else {
      await rm(scratchPath, { force: true });
      removals.push({ scratchPath, action: 'removed' });
    }
  }
  return removals;
}

/** What a fleecing's ledger row carries for the hunter (the row's `adapter` details). */
export interface FleecingLedgerDetails {
  fleecing: true;
  /** Session tag in every name the fleecing gave QEMU. */
  tag: string;
  /** One entry per disk, in the order of the fleecing's disks. */
  scratch: FleeceScratch[];
}

/** The fleecing details of a ledger row's adapter JSON (read from the catalog: checked), or undefined if it is no fleecing row. */
export function fleecingDetailsOf(adapter: Record<string, unknown> | undefined): FleecingLedgerDetails | undefined {
  if (adapter?.['fleecing'] !== true) return undefined;
  const tag = adapter['tag'];
  const scratch = adapter['scratch'];
  if (typeof tag !== 'string' || !/^[0-9a-f]{8}$/.test(tag) || !Array.isArray(scratch)) return undefined;
  const entries: FleeceScratch[] = [];
  for (const entry of scratch as unknown[]) {
    if (typeof entry !== 'object' || entry === null) return undefined;
    const { diskName, nodeName, scratchPath, scratchNodeName, jobId } = entry as Record<string, unknown>;
    if (typeof diskName !== 'string' || typeof nodeName !== 'string' || typeof scratchPath !== 'string' || typeof scratchNodeName !== 'string' || typeof jobId !== 'string') return undefined;
    entries.push({ diskName, nodeName, scratchPath, scratchNodeName, jobId });
  }
  return { fleecing: true, tag, scratch: entries };
}

/** What the hunter did (or would do) about one disk's fleecing of a ledger row. */
export interface FleecingRepair {
  scratchPath: string;
  action: 'removed-fleecing' | 'already-gone' | 'left-in-place';
  detail: string;
}

/**
 * Undoes the fleecing a ledger row records, whose task is gone: with QEMU answering (`qmp`), removes what it
 * still holds of it (exports, nodes, jobs: the guest then writes straight to its disks), then the scratch
 * images. Without QEMU, a scratch image nobody holds open is deleted (it holds only old data); one a process
 * still holds (QEMU busy with another client) stays, with the row, for a later hunt.
 */
export async function repairFleecingLedgerRow(qmp: QmpSession | undefined, details: FleecingLedgerDetails, options: { dryRun: boolean }): Promise<FleecingRepair[]> {
  const names = details.scratch.map((entry, position) => fleeceNamesOf(details.tag, Number(fleeceNamePattern.exec(entry.scratchNodeName)?.[2] ?? position)));
  let inQemu = '';
  if (qmp) {
    const removed = await removeFleeceFromQemu(qmp, names, { dryRun: options.dryRun });
    const parts = [...removed.exports.map((id) => `export ${id}`), ...removed.jobs.map((id) => `job ${id}`), ...removed.nodes.map((name) => `node ${name}`)];
    inQemu = parts.length > 0 ? `removed from QEMU: ${parts.join(', ')}` : '';
  }
  const held = qmp ? new Set<string>() : await pathsHeldOpen(details.scratch.map((entry) => entry.scratchPath));
  const repairs: FleecingRepair[] = [];
  for (const { scratchPath } of details.scratch) {
    const exists = await pathExists(scratchPath);
    const ours = fleeceScratchFilePattern.test(basename(scratchPath));
    if (held.has(scratchPath)) {
      repairs.push({ scratchPath, action: 'left-in-place', detail: 'QEMU does not answer and a process still holds the scratch image open' });
    } else if (exists && !ours) {
      repairs.push({ scratchPath, action: 'left-in-place', detail: 'the file name is not one snapshift gives scratch images: not deleted' });
    } else if (exists || inQemu !== '') {
      if (exists && !options.dryRun) await rm(scratchPath, { force: true });
      const what = [inQemu, exists ? 'scratch image deleted (it held only old data)' : ''].filter(Boolean).join('; ');
      repairs.push({ scratchPath, action: 'removed-fleecing', detail: qmp ? what : `QEMU is not running: ${what}` });
      inQemu = ''; // reported once, with the first disk
    } else {
      repairs.push({ scratchPath, action: 'already-gone', detail: 'no scratch image and nothing in QEMU: nothing to do' });
    }
  }
  return repairs;
}
