// hallmark crl show: the current full (or delta) CRL of an issuing CA.
//
// A stored CRL that is still current is shown from the store alone (no passphrase). When there is none,
// or it is stale, a new one is generated, which needs the CA key: the authority is opened then.

import { EventEmitter } from 'node:events';
import { writeFile } from 'node:fs/promises';
import { CrlPublisher, type CrlKind, type CrlRecord } from '../../authority/crl-publisher.js';
import { parseCrl } from '../../protocols/crl/crl.js';
import { encodePem } from '../../pki/pem.js';
import { withAuthority, withStoreOnly } from '../context.js';
import { UsageError, flag, info, out, required, str, type Command } from '../io.js';

class NeedsKey extends Error {}

async function currentCrl(args: Parameters<Command['run']>[0], ca: string, kind: CrlKind): Promise<CrlRecord> {
  try {
    // Read-only first: a publisher whose CA has no key here refuses to sign, so a current stored CRL is
    // returned as it is and anything else asks for the authority below.
    return await withStoreOnly(args, async (directory) => {
      const publisher = new CrlPublisher({
        store: directory.store, directory, config: directory.config, events: new EventEmitter(),
        signingCa: () => Promise.reject(new NeedsKey()),
      }, { checkEveryMs: 0 });
      try { return await publisher.current(ca, kind); } finally { await publisher.stop(); }
    });
  } catch (err) {
    if (!(err instanceof NeedsKey)) throw err;
  }
  info(`No current ${kind} CRL for ${ca} is stored: generating one (needs the CA key).`);
  return withAuthority(args, async (authority) => {
    const publisher = new CrlPublisher(authority, { checkEveryMs: 0, actor: 'cli' });
    try { return await publisher.current(ca, kind); } finally { await publisher.stop(); }
  });
}

export const crlShowCommand: Command = {
  name: 'crl show',
  summary: 'the current CRL of an issuing CA (number, validity, entries); generates one when stale',
  usage: `Usage: hallmark crl show --ca NAME [--home DIR] [--delta] [--out FILE] [--pem | --der] [--json]

Prints the CRL number, thisUpdate, nextUpdate and the revoked serials with their reasons.
  --delta     the delta CRL instead of the full CRL
  --out FILE  also write the CRL to FILE (DER, or PEM with --pem)
  --pem/--der without --out: write the CRL itself to stdout (the summary goes to stderr)
  --json      the summary as JSON
The same CRLs are served at http://HOST/crl/NAME.crl and /crl/NAME-delta.crl by hallmark serve.
Generating a new CRL (none stored, or the stored one stale) needs the passphrase.`,
  options: { ca: { type: 'string' }, delta: { type: 'boolean' }, out: { type: 'string' }, pem: { type: 'boolean' }, der: { type: 'boolean' }, json: { type: 'boolean' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    const ca = required(args, 'ca', this.usage);
    if (flag(args, 'pem') && flag(args, 'der')) throw new UsageError(`--pem and --der exclude each other\n\n${this.usage}`);
    const kind: CrlKind = flag(args, 'delta') ? 'delta' : 'full';
    const crl = await currentCrl(args, ca, kind);
    const parsed = parseCrl(crl.der);
    const encoded = (pem: boolean): Buffer | string => (pem ? encodePem('X509 CRL', crl.der) : crl.der);
    const target = str(args, 'out');
    const summary = {
      ca: crl.ca,
      kind: crl.kind,
      number: crl.number,
      ...(crl.baseNumber !== null ? { baseNumber: crl.baseNumber } : {}),
      thisUpdate: crl.thisUpdate.toISOString(),
      nextUpdate: crl.nextUpdate.toISOString(),
      entries: parsed.entries.map((e) => ({ serial: e.serialHex, revokedAt: e.revokedAt.toISOString(), reason: e.reason })),
    };
    const text = [
      `${kind === 'full' ? 'Full' : 'Delta'} CRL of ${crl.ca}: number ${crl.number}${crl.baseNumber !== null ? ` (delta of ${crl.baseNumber})` : ''}`,
      `thisUpdate: ${summary.thisUpdate}`,
      `nextUpdate: ${summary.nextUpdate}`,
      `entries:    ${summary.entries.length}`,
      ...summary.entries.map((e) => `  ${e.serial}  ${e.revokedAt}  ${e.reason}`),
    ].join('\n');
    const report = flag(args, 'json') ? JSON.stringify(summary, null, 2) : text;
    if (target) {
      await writeFile(target, encoded(flag(args, 'pem')));
      out(report);
      info(`CRL written to ${target}`);
    } else if (flag(args, 'pem') || flag(args, 'der')) {
      process.stdout.write(encoded(flag(args, 'pem')));
      info(report);
    } else {
      out(report);
    }
    return 0;
  },
};
