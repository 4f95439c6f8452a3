// A streaming reader for a top-level JSON array of objects (the Microchip manifest): it yields one
// element at a time, parsed, so a manifest of any length is read in constant memory (one element
// at a time, each at most MAX_ELEMENT_BYTES).
//
// It scans bytes: structural characters are ASCII and UTF-8 continuation bytes are >= 0x80, so
// tracking only string state (quote / backslash) and brace depth finds element boundaries exactly.
// Each element's bytes are then handed to JSON.parse, which does the real validation.

import { HallmarkError } from '../../errors.js';

export const MAX_ELEMENT_BYTES = 1024 * 1024;

export interface ArrayElement {
  /** 1-based position in the array. */
  readonly index: number;
  /** 1-based line on which the element starts. */
  readonly line: number;
  readonly value: unknown;
}

const WS = new Set([0x20, 0x09, 0x0a, 0x0d]);
const BOM = [0xef, 0xbb, 0xbf];
const invalid = (message: string): HallmarkError => new HallmarkError('MANIFEST_INVALID', message);

type State = 'start' | 'first' | 'value' | 'after' | 'done';

/** Yields the objects of a JSON array read from `chunks`. Throws MANIFEST_INVALID for anything else, naming the element. */
export async function* jsonArrayElements(chunks: AsyncIterable<Buffer>): AsyncGenerator<ArrayElement> {
  let state: State = 'start';
  let line = 1;
  let index = 0;
  // Inside an element:
  let depth = 0;
  let inString = false;
  let escaped = false;
  let parts: Buffer[] = [];
  let size = 0;
  let startLine = 0;
  let offset = 0; // bytes before this chunk

  for await (const chunk of chunks) {
    let i = 0;
    // A UTF-8 byte order mark (EF BB BF) at the very start is skipped, however the stream is chunked.
    while (state === 'start' && offset + i < 3 && i < chunk.length && chunk[i] === BOM[offset + i]) i++;
    offset += chunk.length;
    let from = -1; // start of the current element within this chunk
    if (depth > 0) from = i;
    for (; i < chunk.length; i++) {
      const c = chunk[i]!;
      if (depth > 0) {
        if (inString) {
          // Jump to the next quote (memchr) and tell whether it is escaped by the backslashes before it.
          // Newlines inside a string are not counted: a raw newline there is invalid JSON, and the
          // element fails (naming its first line) before any later line number is reported.
          if (escaped) { escaped = false; continue; }
          const q = chunk.indexOf(0x22, i);
          const stop = q < 0 ? chunk.length : q;
          let backslashes = 0;
          while (stop - backslashes - 1 >= i && chunk[stop - backslashes - 1] === 0x5c) backslashes++;
          if (q < 0) { escaped = (backslashes & 1) === 1; i = chunk.length; continue; }
          if ((backslashes & 1) === 0) inString = false;
          i = q;
          continue;
        }
        if (c === 0x0a) line++;
        if (c === 0x22) inString = true;
        else if (c === 0x7b || c === 0x5b) depth++;
        else if (c === 0x7d || c === 0x5d) {
          depth--;
          if (depth === 0) {
            parts.push(chunk.subarray(from, i + 1));
            size += i + 1 - from;
            if (size > MAX_ELEMENT_BYTES) throw new HallmarkError('INPUT_TOO_LARGE', `entry ${index} (line ${startLine}) is over ${MAX_ELEMENT_BYTES} bytes`);
            const text = parts.length === 1 ? parts[0]!.toString('utf8') : Buffer.concat(parts, size).toString('utf8');
            parts = [];
            size = 0;
            from = -1;
            let value: unknown;
            try {
              value = JSON.parse(text);
            } catch (err) {
              throw invalid(`entry ${index} (line ${startLine}) is not valid JSON: ${(err as Error).message}`);
            }
            state = 'after';
            yield { index, line: startLine, value };
          }
        }
        continue;
      }
      if (c === 0x0a) { line++; continue; }
      if (WS.has(c)) continue;
      switch (state) {
        case 'start':
          if (c !== 0x5b) throw invalid(`line ${line}: a Microchip manifest is a JSON array (it must start with "[")`);
          state = 'first';
          break;
        case 'first':
        case 'value':
          if (c === 0x5d && state === 'first') { state = 'done'; break; }
          if (c !== 0x7b) throw invalid(`entry ${index + 1} (line ${line}) is not a JSON object`);
          index++;
          depth = 1;
          inString = false;
          escaped = false;
          startLine = line;
          from = i;
          break;
        case 'after':
          if (c === 0x2c) state = 'value';
          else if (c === 0x5d) state = 'done';
          else throw invalid(`line ${line}: expected "," or "]" after entry ${index}`);
          break;
        case 'done':
          throw invalid(`line ${line}: unexpected content after the end of the JSON array`);
      }
    }
    if (depth > 0 && from >= 0) {
      // The element continues in the next chunk: keep a copy (the stream may reuse its buffer).
      const piece = Buffer.from(chunk.subarray(from));
      parts.push(piece);
      size += piece.length;
      if (size > MAX_ELEMENT_BYTES) throw new HallmarkError('INPUT_TOO_LARGE', `entry ${index} (line ${startLine}) is over ${MAX_ELEMENT_BYTES} bytes`);
    }
  }
  if (depth > 0) throw invalid(`the file is truncated: entry ${index} (line ${startLine}) is not complete`);
  if (state === 'start') throw invalid('the file is empty: a Microchip manifest is a JSON array');
  if (state !== 'done') throw invalid(`the file is truncated: the JSON array is not closed after entry ${index}`);
}
