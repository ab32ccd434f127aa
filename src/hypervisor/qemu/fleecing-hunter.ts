import { rm } from 'node:fs/promises';
import { basename } from 'node:path';
import { pathExists } from '../../core/fs-probe.ts';
import { blockNodeNames, queryNamedBlockNodes } from './block-graph.ts';
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
 * only old data, so dropping it loses nothing. Nothing without our name is touched.
 */
export async function removeLeftoverFleecing(qmp: QmpSession, isLiveTag: (tag: string) => boolean): Promise<LeftoverFleecing[]> {
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

  // Where the scratch images are, read before their nodes go.
  const scratchFiles = new Map<string, string>();
  for (const node of await queryNamedBlockNodes(qmp).catch(() => [])) {
    if (fleeceNamePattern.test(node['node-name']) && node.drv === 'qcow2' && fleeceScratchFilePattern.test(basename(node.file))) scratchFiles.set(node['node-name'], node.file);
  }
  const report: LeftoverFleecing[] = [];
  for (const [tag, indices] of indicesByTag) {
    const names = [...indices].sort((a, b) => a - b).map((index) => fleeceNamesOf(tag, index));
    const removed = await removeFleeceFromQemu(qmp, names);
    const scratchPaths: string[] = [];
    for (const { scratchNodeName } of names) {
      const path = scratchFiles.get(scratchNodeName);
      if (path === undefined) continue;
      await rm(path, { force: true });
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
