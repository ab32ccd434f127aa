import { SnapshiftError } from '../core/errors.ts';

/**
 * The layout of a fresh qcow2 v3 image whose allocated clusters are known before the first byte is written
 * (QEMU docs/interop/qcow2.txt): header, refcount table, refcount blocks, L1 table, L2 tables, then the data
 * clusters in disk order. Unallocated clusters read as zeros (no backing file), so zero chunks cost nothing.
 * Everything has refcount 1, so every L1/L2 entry carries the COPIED flag, as QEMU writes it.
 */
export interface Qcow2Layout {
  /** Header, refcount structures, L1 and L2 tables: written at offset 0 as one buffer. */
  metadata: Buffer;
  /** Where the data of the guest range starting at `guestOffsetBytes` (a data chunk's start) goes in the file. */
  hostOffsetOf(guestOffsetBytes: number): number;
  /** The file's size once every data cluster is written. */
  fileSizeBytes: number;
  virtualSizeBytes: number;
}

const clusterBits = 16;
const clusterBytes = 1 << clusterBits;
/** 16-bit refcounts (refcount_order 4): 32768 per refcount block. */
const refcountsPerBlock = clusterBytes / 2;
const l2EntriesPerTable = clusterBytes / 8;
const copiedFlag = 1n << 63n;
const headerLengthBytes = 104;

/**
 * Lays out an image of `sizeBytes` (rounded up to 512, as qcow2's virtual size must be) whose data lives in the
 * chunks `dataChunkOffsets` (ascending, each `chunkSizeBytes` long or shorter at the end of the disk).
 */
export function qcow2Layout(sizeBytes: number, chunkSizeBytes: number, dataChunkOffsets: readonly number[]): Qcow2Layout {
  if (chunkSizeBytes % clusterBytes !== 0) throw new SnapshiftError('BAD_ARGUMENT', `chunk size ${chunkSizeBytes} is not a multiple of the qcow2 cluster size ${clusterBytes}`);
  const virtualSizeBytes = Math.ceil(sizeBytes / 512) * 512;
  const clustersPerL2 = l2EntriesPerTable;
  const l1Entries = Math.max(1, Math.ceil(virtualSizeBytes / (clustersPerL2 * clusterBytes)));
  const l1Clusters = Math.ceil((l1Entries * 8) / clusterBytes);
  // Guest clusters holding data, in order, and the L2 tables they need.
  const chunkClusters = chunkSizeBytes / clusterBytes;
  let dataClusters = 0;
  const l2Tables = new Set<number>();
  for (const offset of dataChunkOffsets) {
    const clusters = Math.min(chunkClusters, Math.ceil((virtualSizeBytes - offset) / clusterBytes));
    dataClusters += clusters;
    const firstCluster = offset / clusterBytes;
    for (let table = Math.floor(firstCluster / clustersPerL2); table <= Math.floor((firstCluster + clusters - 1) / clustersPerL2); table++) l2Tables.add(table);
  }
  // Refcount structures cover every cluster, themselves included: grow until they do.
  const fixedClusters = 1 + l1Clusters + l2Tables.size + dataClusters;
  let refcountBlocks = 1;
  let refcountTableClusters = 1;
  for (;;) {
    const total = fixedClusters + refcountBlocks + refcountTableClusters;
    const blocksNeeded = Math.ceil(total / refcountsPerBlock);
    const tableNeeded = Math.ceil((blocksNeeded * 8) / clusterBytes);
    if (blocksNeeded <= refcountBlocks && tableNeeded <= refcountTableClusters) break;
    refcountBlocks = Math.max(refcountBlocks, blocksNeeded);
    refcountTableClusters = Math.max(refcountTableClusters, tableNeeded);
  }
  const refcountTableCluster = 1;
  const refcountBlockCluster = refcountTableCluster + refcountTableClusters;
  const l1Cluster = refcountBlockCluster + refcountBlocks;
  const firstL2Cluster = l1Cluster + l1Clusters;
  const firstDataCluster = firstL2Cluster + l2Tables.size;
  const totalClusters = firstDataCluster + dataClusters;

  const metadata = Buffer.alloc(firstDataCluster * clusterBytes);
  // Header (qcow2.txt "Header"), version 3, no extensions beyond the end marker the zeroed bytes already are.
  metadata.write('QFI\xfb', 0, 'latin1');
  metadata.writeUInt32BE(3, 4);
  metadata.writeUInt32BE(clusterBits, 20);
  metadata.writeBigUInt64BE(BigInt(virtualSizeBytes), 24);
  metadata.writeUInt32BE(l1Entries, 36);
  metadata.writeBigUInt64BE(BigInt(l1Cluster * clusterBytes), 40);
  metadata.writeBigUInt64BE(BigInt(refcountTableCluster * clusterBytes), 48);
  metadata.writeUInt32BE(refcountTableClusters, 56);
  metadata.writeUInt32BE(4, 96); // refcount_order: 16-bit refcounts
  metadata.writeUInt32BE(headerLengthBytes, 100);
  for (let block = 0; block < refcountBlocks; block++) {
    metadata.writeBigUInt64BE(BigInt((refcountBlockCluster + block) * clusterBytes), refcountTableCluster * clusterBytes + block * 8);
  }
  for (let cluster = 0; cluster < totalClusters; cluster++) metadata.writeUInt16BE(1, refcountBlockCluster * clusterBytes + cluster * 2);
  const l2ClusterOf = new Map<number, number>();
  [...l2Tables].sort((a, b) => a - b).forEach((table, i) => {
    const cluster = firstL2Cluster + i;
    l2ClusterOf.set(table, cluster);
    metadata.writeBigUInt64BE(BigInt(cluster * clusterBytes) | copiedFlag, l1Cluster * clusterBytes + table * 8);
  });
  // L2 entries: guest cluster -> host cluster; and where each data chunk starts in the file.
  const hostOffsets = new Map<number, number>();
  let nextDataCluster = firstDataCluster;
  for (const offset of dataChunkOffsets) {
    hostOffsets.set(offset, nextDataCluster * clusterBytes);
    const clusters = Math.min(chunkClusters, Math.ceil((virtualSizeBytes - offset) / clusterBytes));
    for (let i = 0; i < clusters; i++) {
      const guestCluster = offset / clusterBytes + i;
      const l2Cluster = l2ClusterOf.get(Math.floor(guestCluster / clustersPerL2))!;
      metadata.writeBigUInt64BE(BigInt(nextDataCluster * clusterBytes) | copiedFlag, l2Cluster * clusterBytes + (guestCluster % clustersPerL2) * 8);
      nextDataCluster++;
    }
  }
  return {
    metadata,
    hostOffsetOf: (guestOffsetBytes) => {
      const host = hostOffsets.get(guestOffsetBytes);
      if (host === undefined) throw new SnapshiftError('BAD_ARGUMENT', `no data chunk starts at ${guestOffsetBytes} in this qcow2 layout`);
      return host;
    },
    fileSizeBytes: totalClusters * clusterBytes,
    virtualSizeBytes,
  };
}
