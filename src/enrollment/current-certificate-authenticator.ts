// Current certificate (re-enrolment): mutual TLS with an operational certificate this authority issued
// to the device. The TLS handshake proved the client holds its key; the exact certificate must be on
// record here, valid (not revoked), unexpired, and a device certificate.

import { createPublicKey } from 'node:crypto';
import { HallmarkError } from '../errors.js';
import { parseCertificate, serialToHex } from '../pki/certificate.js';
import { rawSql } from '../store/raw-sql.js';
import { NotApplicable, type AuthenticatorContext, type EnrolmentAuthenticator, type EnrolmentIdentity, type EnrolmentRequest } from './authenticator.js';

export const currentCertificateAuthenticator: EnrolmentAuthenticator = {
  name: 'current-certificate',
  presentIn: (request) => request.peerChain.length > 0,
  async authenticate(request: EnrolmentRequest, context: AuthenticatorContext): Promise<EnrolmentIdentity> {
    const der = request.peerChain[0]!;
    let leaf;
    try {
      leaf = parseCertificate(der);
    } catch {
      throw new NotApplicable('ENROLMENT_REFUSED', 'the client certificate was not issued by this authority (it cannot be parsed)');
    }
    // Found by its serial (certificates_serial; migration 0007_est_indexes dropped the fingerprint index
    // this lookup alone used) and confirmed by its whole DER: one serial may repeat across issuers.
    const rows = (await rawSql<{ serial: string; status: string; not_after: string; not_before: string; device_udid: string | null; der: Uint8Array; revocation_reason: string | null }>(context.store.db, context.store.dialect,
      'select serial, status, not_after, not_before, device_udid, der, revocation_reason from certificates where serial = ?', [serialToHex(Buffer.from(leaf.serialHex, 'hex'))])).rows;
    const row = rows.find((r) => Buffer.from(r.der).equals(der));
    if (!row) throw new NotApplicable('ENROLMENT_REFUSED', 'the client certificate was not issued by this authority');
    if (!row.device_udid) throw new HallmarkError('ENROLMENT_REFUSED', `certificate ${row.serial} is not a device certificate`);
    const now = new Date();
    if (row.status !== 'valid') throw new HallmarkError('ENROLMENT_REFUSED', `certificate ${row.serial} of device ${row.device_udid} is ${row.status}${row.revocation_reason ? ` (${row.revocation_reason})` : ''}`);
    if (new Date(row.not_after) <= now) throw new HallmarkError('ENROLMENT_REFUSED', `certificate ${row.serial} of device ${row.device_udid} expired at ${row.not_after}`);
    if (new Date(row.not_before) > now) throw new HallmarkError('ENROLMENT_REFUSED', `certificate ${row.serial} of device ${row.device_udid} is not valid before ${row.not_before}`);
    const spki = createPublicKey({ key: leaf.subjectPublicKeyInfo, format: 'der', type: 'spki' }).export({ type: 'spki', format: 'der' });
    return {
      authenticator: 'current-certificate',
      udid: row.device_udid,
      provenKeys: [spki],
      actor: `device:${row.device_udid}`,
      details: { authenticator: 'current-certificate', previousSerial: row.serial },
      renewal: { serial: row.serial, notBefore: new Date(row.not_before), notAfter: new Date(row.not_after) },
    };
  },
};
