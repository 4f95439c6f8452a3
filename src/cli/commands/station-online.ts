// hallmark station create / install / import / list: the online side of an offline factory station
// (src/authority/station.ts). The station's own commands (init, sign, export, status) run at the factory.

import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { HallmarkError } from '../../errors.js';
import { publicKeyFromFile } from '../../pki/public-key.js';
import type { StationDeviceRegistration, StationImportReport } from '../../authority/station.js';
import { withAuthority, withStoreOnly } from '../context.js';
import { UsageError, actor, flag, info, out, required, str, table, type Command, type ParsedArgs } from '../io.js';

// The station module is loaded when a station command runs, not at every `hallmark` start.
const stationModule = () => import('../../authority/station.js');

async function readInput(file: string, what: string): Promise<Buffer> {
  try { return await readFile(file); } catch { throw new HallmarkError('BAD_REQUEST', `cannot read ${what} ${file}`); }
}

/** The station token's PIN: --pin-file, then HALLMARK_STATION_PIN, then HALLMARK_PKCS11_PIN. Never the authority passphrase. */
function readPin(args: ParsedArgs): string {
  const file = str(args, 'pin-file');
  if (file) {
    let text: string;
    try { text = readFileSync(file, 'utf8'); } catch (err) { throw new HallmarkError('PASSPHRASE_REQUIRED', `cannot read PIN file ${file}: ${(err as NodeJS.ErrnoException).code}`); }
    return text.replace(/\r?\n$/, '');
  }
  const pin = process.env.HALLMARK_STATION_PIN || process.env.HALLMARK_PKCS11_PIN;
  if (!pin) throw new HallmarkError('PASSPHRASE_REQUIRED', 'the station token\'s PIN is needed: --pin-file FILE or HALLMARK_STATION_PIN');
  return pin;
}

function parseDate(name: string, text: string): Date {
  const d = /^\d{4}-\d{2}-\d{2}/.test(text) ? new Date(text) : new Date(NaN);
  if (Number.isNaN(d.getTime())) throw new HallmarkError('BAD_REQUEST', `--${name} is not an ISO 8601 date: ${JSON.stringify(text)}`);
  return d;
}

function positiveInt(args: ParsedArgs, name: string, usage: string): number {
  const v = required(args, name, usage);
  if (!/^\d{1,9}$/.test(v) || Number(v) < 1) throw new UsageError(`--${name} must be a whole number from 1`);
  return Number(v);
}

/**
 * --devices FILE: the batch's registered devices, as JSON — an array of { "publicKey": PEM or base64 SPKI DER,
 * "udid"?: hex, "serialNumber"?: text }.
 */
async function readDevices(file: string): Promise<StationDeviceRegistration[]> {
  const text = (await readInput(file, 'device list')).toString('utf8');
  let list: unknown;
  try { list = JSON.parse(text); } catch { throw new HallmarkError('BAD_REQUEST', `${file} is not JSON (an array of {"publicKey", "udid"?, "serialNumber"?})`); }
  if (!Array.isArray(list) || list.length === 0) throw new HallmarkError('BAD_REQUEST', `${file} must hold a non-empty JSON array of devices`);
  return list.map((d: unknown, i) => {
    const o = d as { publicKey?: unknown; udid?: unknown; serialNumber?: unknown };
    if (!o || typeof o.publicKey !== 'string') throw new HallmarkError('BAD_REQUEST', `${file}: device ${i + 1} has no publicKey`);
    const key = o.publicKey.includes('-----BEGIN') ? Buffer.from(o.publicKey) : Buffer.from(o.publicKey, 'base64');
    if (o.udid !== undefined && typeof o.udid !== 'string') throw new HallmarkError('BAD_REQUEST', `${file}: device ${i + 1}: udid must be hex text`);
    if (o.serialNumber !== undefined && o.serialNumber !== null && typeof o.serialNumber !== 'string') throw new HallmarkError('BAD_REQUEST', `${file}: device ${i + 1}: serialNumber must be text`);
    return {
      publicKeySpki: publicKeyFromFile(key),
      ...(o.udid !== undefined ? { udid: o.udid as string } : {}),
      ...(typeof o.serialNumber === 'string' ? { serialNumber: o.serialNumber } : {}),
    };
  });
}

export const stationCreateCommand: Command = {
  name: 'station create',
  summary: 'online: prepare an offline factory station (batch, quota, sub-CA key in its token, package)',
  usage: `Usage: hallmark station create --line NAME --quota N --valid-until DATE --key pkcs11:token=LABEL[;object=LABEL]
                              --out PACKAGE [--product NAME] [--module PATH] [--pin-file FILE]
                              [--devices FILE] [--key-algorithm ALG] [--root-dir DIR] [--json] [--home DIR]

Opens a batch of the product on the line with quota N that expires at DATE, generates the station's
sub-CA key in the PKCS#11 token (it never leaves the token; the PIN comes from --pin-file,
HALLMARK_STATION_PIN or HALLMARK_PKCS11_PIN; the module from --module or HALLMARK_PKCS11_MODULE) and
writes the package PACKAGE/: station.json (line, batch, quota, validity, the device subject base, the
key's URI), station.csr (signed by the token key) and chain.pem. The station's CA is recorded as
pending, with no key online: this server never signs with it.
--devices FILE lists the batch's devices in advance (JSON: [{"publicKey": PEM or base64 SPKI,
"udid"?: HEX, "serialNumber"?: TEXT}]); the station then signs only their keys. Without it the station
signs any device key and the device's UDID is the SHA-256 of its key.
Then, at the root ceremony, run the printed "hallmark root sign" command (it adds --path-len 0, the
name constraint and --not-after), and: hallmark station install PACKAGE.`,
  options: {
    line: { type: 'string' }, quota: { type: 'string' }, 'valid-until': { type: 'string' }, product: { type: 'string' }, key: { type: 'string' },
    'pin-file': { type: 'string' }, module: { type: 'string' }, out: { type: 'string' }, devices: { type: 'string' }, 'key-algorithm': { type: 'string' },
    'root-dir': { type: 'string' }, json: { type: 'boolean' }, 'passphrase-file': { type: 'string' },
  },
  async run(args) {
    const line = required(args, 'line', this.usage);
    const quota = positiveInt(args, 'quota', this.usage);
    const validUntil = parseDate('valid-until', required(args, 'valid-until', this.usage));
    const keyUri = required(args, 'key', this.usage);
    const outDir = required(args, 'out', this.usage);
    const devicesFile = str(args, 'devices');
    const devices = devicesFile ? await readDevices(devicesFile) : undefined;
    const pin = readPin(args);
    const { createStation } = await stationModule();
    return withAuthority(args, async (authority) => {
      const s = await createStation(authority, {
        line, quota, validUntil, keyUri, pin, outDir, actor: actor(),
        ...(str(args, 'product') !== undefined ? { product: str(args, 'product') } : {}),
        ...(str(args, 'module') !== undefined ? { module: str(args, 'module') } : {}),
        ...(str(args, 'key-algorithm') !== undefined ? { algorithm: str(args, 'key-algorithm') } : {}),
        ...(str(args, 'root-dir') !== undefined ? { rootDir: str(args, 'root-dir') } : {}),
        ...(devices ? { devices } : {}),
      });
      if (flag(args, 'json')) {
        out(JSON.stringify({ station: s.id, ca: s.ca, line: s.line, product: s.product, batch: s.batch, quota: s.quota, validUntil: s.validUntil, keyUri: s.keyUri, deviceSubjectBase: s.deviceSubjectBase, package: s.packageDir, rootSign: s.rootSignArgs }, null, 2));
        return 0;
      }
      info(`Station ${s.id}: line ${s.line}, product ${s.product}, batch ${s.batch}, quota ${s.quota}, valid until ${s.validUntil}`);
      info(`  sub-CA key in the token: ${s.keyUri}`);
      info(`  devices will be named:   ${s.deviceSubjectBase}, CN=<UDID>`);
      info(`  package:                 ${s.packageDir} (station.json, station.csr, chain.pem)`);
      info('Next, at the root ceremony (offline):');
      out(s.rootSignCommand);
      info(`Then, online: hallmark station install ${s.packageDir}`);
      return 0;
    });
  },
};

export const stationInstallCommand: Command = {
  name: 'station install',
  summary: 'online: install the station certificate the root ceremony signed and complete the package',
  usage: `Usage: hallmark station install PACKAGE [--cert FILE] [--home DIR]

Checks the certificate (PACKAGE/station.pem unless --cert FILE): signed by an active root, for this
station's key, pathLen 0, a critical name constraint permitting exactly the batch's device subject,
ending no later than the station's validity; and that PACKAGE is the package station create wrote for
that station. The station's CA becomes active (its key stays in the factory token) and PACKAGE gets
station.pem and chain.pem. The package then goes to the factory: hallmark station init PACKAGE --key URI.`,
  allowPositionals: true,
  options: { cert: { type: 'string' }, 'passphrase-file': { type: 'string' }, json: { type: 'boolean' } },
  async run(args) {
    const packageDir = args.positionals[0];
    if (!packageDir || args.positionals.length > 1) throw new UsageError(`give one package directory\n\n${this.usage}`);
    const certFile = str(args, 'cert');
    const certificate = certFile ? await readInput(certFile, 'certificate') : undefined;
    const { installStation } = await stationModule();
    return withAuthority(args, async (authority) => {
      const r = await installStation(authority, { packageDir, actor: actor(), ...(certificate ? { certificate } : {}) });
      if (flag(args, 'json')) { out(JSON.stringify(r, null, 2)); return 0; }
      out(`${r.alreadyInstalled ? 'Already installed' : 'Installed'} station ${r.id} (CA ${r.ca}, line ${r.line}, batch ${r.batch}): ${r.subject}, serial ${r.serial}, signed by ${r.root}, valid until ${r.notAfter}`);
      info(`The package ${packageDir} is complete: take it to the factory (hallmark station init ${packageDir} --key URI).`);
      return 0;
    });
  },
};

export const stationImportCommand: Command = {
  name: 'station import',
  summary: 'online: import a station journal (verify, register the devices, record their certificates)',
  usage: `Usage: hallmark station import JOURNAL [--station ID] [--json] [--home DIR]

Verifies the journal's hash chain and the station's signatures, then in one transaction registers the
devices of the valid entries in the station's batch (or matches them to its registered devices), records
their certificates and counts them against the quota, audited. Entries imported before are skipped
(importing the same journal again imports nothing). Duplicate, missing, edited, forged or unsigned
entries, entries beyond the quota, certificates not signed by the station's key and journals of another
station (--station ID makes that explicit) are reported and not imported.
Exit status: 0 when nothing was refused, 1 when some entries were refused (listed with their reasons).

Revocation: hallmark revoke --device UDID marks a station device's certificates revoked and the device
revoked in the registry; the connection checker (hallmark connect check, and services that ask it)
refuses it at once. No CRL or OCSP answer is made for a station's CA — its key is in the factory's
token, never online — so a relying party that checks only CRLs or OCSP does not see the revocation.`,
  allowPositionals: true,
  options: { station: { type: 'string' }, json: { type: 'boolean' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    const file = args.positionals[0];
    if (!file || args.positionals.length > 1) throw new UsageError(`give one journal file\n\n${this.usage}`);
    let journal: Buffer;
    try { journal = await readFile(file); } catch { throw new HallmarkError('JOURNAL_INVALID', `cannot read the journal ${file}`); }
    const { importJournal } = await stationModule();
    return withAuthority(args, async (authority) => {
      const r = await importJournal(authority, { journal, actor: actor(), ...(str(args, 'station') !== undefined ? { station: str(args, 'station') } : {}) });
      if (flag(args, 'json')) out(JSON.stringify(r, null, 2));
      else printReport(r);
      return r.refused.length === 0 ? 0 : 1;
    });
  },
};

function printReport(r: StationImportReport): void {
  out(`Station ${r.station} (line ${r.line}, batch ${r.batch}): ${r.entries} journal entries; ${r.imported.length} imported, ${r.alreadyImported.length} already imported, ${r.refused.length} refused`);
  if (r.imported.length === 0 && r.alreadyImported.length > 0 && r.refused.length === 0) out('Nothing new: every entry of this journal was imported before.');
  const newDevices = r.imported.filter((i) => i.newDevice).length;
  if (r.imported.length) out(`  ${newDevices} device(s) registered, ${r.imported.length} certificate(s) recorded (entries ${r.imported[0]!.seq}-${r.imported[r.imported.length - 1]!.seq})`);
  out(`  quota: ${r.quota.issued} of ${r.quota.quota} used, ${r.quota.remaining} left; journal imported up to entry ${r.lastSeq}`);
  for (const n of r.notes) out(`  note: ${n.message}`);
  if (r.refused.length) {
    out('Refused (not imported):');
    for (const p of r.refused) out(`  ${p.seq === 0 ? 'journal' : `entry ${p.seq}`}  ${p.kind}: ${p.message}`);
  }
}

export const stationListCommand: Command = {
  name: 'station list',
  summary: 'factory stations: line, batch, quota used, journal imported, status',
  usage: 'Usage: hallmark station list [--json] [--home DIR]',
  options: { json: { type: 'boolean' } },
  async run(args) {
    const { listStations } = await stationModule();
    return withStoreOnly(args, async (directory) => {
      const stations = await listStations(directory);
      if (flag(args, 'json')) { out(JSON.stringify(stations, null, 2)); return 0; }
      if (stations.length === 0) { out('No stations (hallmark station create).'); return 0; }
      out(table(['STATION', 'STATUS', 'LINE', 'PRODUCT', 'BATCH', 'QUOTA', 'ISSUED', 'IMPORTED', 'REFUSED', 'LAST ENTRY', 'VALID UNTIL'],
        stations.map((s) => [s.id, s.status, s.line, s.product, s.batch, String(s.quota), String(s.issued), String(s.imported), String(s.refused), String(s.lastSeq), s.validUntil.slice(0, 10)])));
      return 0;
    });
  },
};
