/**
 * What our NBD server serves: a read-only byte range with a size, its data, and which parts read as zeros.
 * The server knows nothing else about where the bytes come from (a restore point, a file, a test pattern).
 */
export interface NbdExportSource {
  /** Export name clients ask for (NBD_OPT_GO, NBD_OPT_EXPORT_NAME); "" is also served as the default export. */
  readonly name: string;
  /** One line for humans (NBD_INFO_DESCRIPTION, NBD_OPT_LIST). */
  readonly description?: string;
  readonly sizeBytes: number;
  /** Reads a block size worth aligning to (NBD_INFO_BLOCK_SIZE preferred size); default 4096. */
  readonly preferredBlockBytes?: number;
  /**
   * Reads [offsetBytes, offsetBytes + lengthBytes), which the server has checked lies inside the export, as
   * consecutive pieces covering it exactly; a piece without `data` reads as zeros. The server may hold the
   * pieces' buffers until they are written to the socket, and never changes them.
   */
  read(offsetBytes: number, lengthBytes: number, signal: AbortSignal): Promise<ExportPiece[]>;
  /** Consecutive extents from `offsetBytes`, covering at least one byte and at most `lengthBytes`. */
  extents(offsetBytes: number, lengthBytes: number, signal: AbortSignal): Promise<ExportExtent[]>;
}

export interface ExportPiece {
  lengthBytes: number;
  /** Exactly `lengthBytes` long; undefined = zeros. */
  data?: Buffer;
}

export interface ExportExtent {
  lengthBytes: number;
  /** Reads as zeros and holds no data (NBD base:allocation: hole and zero). */
  zero: boolean;
}
