"""The DICOM Structured Report: a TID 1500 Measurement Report written with highdicom.

One measurement group per knee (TID 1501): finding site knee joint with laterality coded (SCT),
the KL grade as a qualitative evaluation, the five grade probabilities and the expected grade as
numeric measurements, the joint space width behind the grade (each compartment's minimum and
central-band mean, in mm, or in % of the tibial plateau width when the film states no pixel
spacing; a collapsed compartment is 0 with a "bone on bone" evaluation; a compartment that could not
be measured is left out and said so), the source image referenced, and the algorithm (klgrade run
name, version, weights fingerprint) identified on the group and every measurement. An instance or knee that was
not graded gets a group whose tracking identifier reads "not graded: <reason>" and whose KL grade
is the code "Not graded". KL grades have no standard code, so they use a private coding scheme
(``99KLGRADE``, declared in the Coding Scheme Identification Sequence).
"""
from __future__ import annotations

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from klgrade.clinic.pacs.grading import InstanceResult, ModelInfo, derived_uid
from klgrade.grades import GRADES, N_GRADES

SCHEME = "99KLGRADE"
KL_GRADE = Code("KLG", SCHEME, "Kellgren-Lawrence grade")
KL_VALUES = tuple(Code(f"KL{g}", SCHEME, f"KL grade {g}") for g in GRADES)
NOT_GRADED = Code("NOTGRADED", SCHEME, "Not graded")
PROB = tuple(Code(f"PKL{g}", SCHEME, f"Probability of KL grade {g}") for g in GRADES)
EXPECTED = Code("EKLG", SCHEME, "Expected KL grade")
UNITY = Code("1", "UCUM", "no units")
GRADE_UNIT = Code("{grade}", "UCUM", "grade")
OSTEOARTHRITIS = Code("396275006", "SCT", "Osteoarthritis")
# No standard code names one compartment's JSW (SNOMED/RadLex code the finding, narrowing), so these
# are the private scheme's too.
COMPARTMENTS = ("medial", "lateral")
JSW_MIN = {c: Code(f"JSWMIN{c[0].upper()}", SCHEME, f"{c.capitalize()} minimum joint space width")
           for c in COMPARTMENTS}
JSW_MEAN = {c: Code(f"JSWMEAN{c[0].upper()}", SCHEME, f"{c.capitalize()} mean joint space width")
            for c in COMPARTMENTS}
JSW_FINDING = Code("JSWF", SCHEME, "Joint space finding")
BONE_ON_BONE = {c: Code(f"BOB{c[0].upper()}", SCHEME, f"{c.capitalize()} compartment bone on bone")
                for c in COMPARTMENTS}
JSW_NOT_MEASURED = {c: Code(f"JSWNM{c[0].upper()}", SCHEME, f"{c.capitalize()} joint space not measured")
                    for c in COMPARTMENTS}
JSW_UNITS = {"mm": Code("mm", "UCUM", "millimeter"), "%plateau": Code("%", "UCUM", "percent")}
RELATIVE_TO_PLATEAU = Code("JSWREL", SCHEME, "Relative to the tibial plateau width (no pixel spacing)")
LATERALITY = {"R": codes.SCT.Right, "L": codes.SCT.Left}
# Type 2 Patient/Study attributes highdicom reads from the evidence; a source without them gets
# them empty (what type 2 means), never a made-up value.
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
          "StudyDate", "StudyTime", "ReferringPhysicianName")


def series_description(model: ModelInfo) -> str:
    """How a rerun recognises this run's SR series in a study (LO: at most 64 characters)."""
    return f"klgrade KL report {model.short}"


def evidence_header(header):
    """A copy of a source header that highdicom can take as evidence / reference dataset."""
    ds = header.copy()
    for kw in _TYPE2:
        if kw not in ds:
            setattr(ds, kw, None)
    return ds


def algorithm(model: ModelInfo) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=f"klgrade {model.name}"[:64], version=model.version,
        parameters=[f"model: {model.description}", f"weights sha1: {model.fingerprint}", f"tta: {model.tta}",
                    "research tool, not for primary diagnosis"])


def _group(res: InstanceResult, knee: dict | None, algo, uid_seed: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for one knee (``knee`` None: the whole instance was not graded)."""
    src = [hd.sr.SourceImageForMeasurementGroup.from_source_image(res.header)]
    sites, measurements = None, None
    if knee is None:
        label, value = f"not graded: {res.reason}", NOT_GRADED
    else:
        lat = LATERALITY.get(knee["side"])
        sites = [hd.sr.FindingSite(anatomic_location=codes.SCT.KneeJoint, laterality=lat)]
        label = f"{knee['side_name']} knee"
        if knee.get("klg") is None:
            label, value = f"{label}: not graded: {knee.get('error', '')}", NOT_GRADED
        else:
            value = KL_VALUES[knee["klg"]]
            measurements = [hd.sr.Measurement(name=PROB[g], value=float(p), unit=UNITY, algorithm_id=algo)
                            for g, p in enumerate(knee["probabilities"])]
            measurements.append(hd.sr.Measurement(name=EXPECTED, value=float(knee["expected_grade"]),
                                                  unit=GRADE_UNIT, algorithm_id=algo))
    evaluations = [hd.sr.QualitativeEvaluation(name=KL_GRADE, value=value)]
    if knee is not None and knee.get("klg") is not None and knee.get("jsw"):
        jsw_values, jsw_findings = _jsw_items(knee["jsw"], algo)
        measurements += jsw_values
        evaluations += jsw_findings
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(uid_seed, "tracking"), identifier=label),
        finding_type=OSTEOARTHRITIS, algorithm_id=algo, finding_sites=sites, measurements=measurements,
        qualitative_evaluations=evaluations, source_images=src)


def _jsw_items(jsw: dict, algo) -> tuple[list, list]:
    """A knee's JSW (Grader.grade's ``jsw`` dict): its measurements and its findings."""
    unit = JSW_UNITS[jsw["unit"]]
    method = RELATIVE_TO_PLATEAU if jsw["unit"] != "mm" else None
    values, findings = [], []
    for c in COMPARTMENTS:
        comp = jsw[c]
        if comp["min"] is None:
            findings.append(hd.sr.QualitativeEvaluation(name=JSW_FINDING, value=JSW_NOT_MEASURED[c]))
            continue
        for name, v in ((JSW_MIN[c], comp["min"]), (JSW_MEAN[c], comp["mean"])):
            if v is not None:
                values.append(hd.sr.Measurement(name=name, value=float(v), unit=unit, method=method,
                                                algorithm_id=algo))
        if comp["flag"] == "bone_on_bone":
            findings.append(hd.sr.QualitativeEvaluation(name=JSW_FINDING, value=BONE_ON_BONE[c]))
    return values, findings


def build_sr(results: list[InstanceResult], model: ModelInfo, series_uid: str, sop_uid: str,
             series_number: int = 900) -> hd.sr.ComprehensiveSR:
    """One SR for the instances of one study (graded or not)."""
    if not results:
        raise ValueError("an SR needs at least one source instance")
    algo = algorithm(model)
    groups = []
    for i, res in enumerate(results):
        knees = res.knees if res.knees else [None]
        groups += [_group(res, k, algo, f"{sop_uid}-{i}-{j}") for j, k in enumerate(knees)]
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("klgrade-device", model.fingerprint), name="klgrade",
            manufacturer_name="klgrade", model_name=model.name[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.PlainRadiography, imaging_measurements=groups)
    evidence = [evidence_header(r.header) for r in results]
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence, content=report, series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer="klgrade", is_complete=True,
        series_description=series_description(model), manufacturer_model_name=model.name[:64],
        software_versions=f"klgrade {model.version}",
        coding_schemes=[CodingSchemeIdentificationItem(designator=SCHEME, name="klgrade KL grading codes")])
    copy_identity(sr, results[0].header)
    return sr


def copy_identity(obj, header) -> None:
    """The source's Patient and Study modules, exactly: highdicom's module tables, plus every
    element of the patient group (0010) the tables leave out (retired ones like OtherPatientIDs
    are still in real headers, and a result that drops them no longer matches its study)."""
    obj.copy_patient_and_study_information(header)
    for elem in header.group_dataset(0x0010):
        obj[elem.tag] = elem


def read_groups(sr) -> list[dict]:
    """The knees of an SR written by ``build_sr``, read back through highdicom (tests, tools)."""
    parsed = sr if isinstance(sr, hd.sr.ComprehensiveSR) else hd.sr.ComprehensiveSR.from_dataset(sr)
    out = []
    for g in parsed.content.get_image_measurement_groups():
        ev = g.get_qualitative_evaluations(name=KL_GRADE)
        code = ev[0].value.value if ev else None
        sites = g.finding_sites
        lat = sites[0].laterality.value if sites and sites[0].laterality is not None else None
        probs = [g.get_measurements(name=PROB[k])[0].value for k in range(N_GRADES)] if code != "NOTGRADED" else None
        exp = g.get_measurements(name=EXPECTED)[0].value if code != "NOTGRADED" else None
        out.append({"label": g.tracking_identifier, "laterality": lat,
                    "klg": int(code[2:]) if code and code.startswith("KL") else None,
                    "probabilities": probs, "expected_grade": exp, "jsw": _read_jsw(g)})
    return out


def _read_jsw(group) -> dict | None:
    """{compartment: {'min', 'mean', 'unit', 'finding'}} of a group written by ``_jsw_items``."""
    findings = {ev.value.value for ev in group.get_qualitative_evaluations(name=JSW_FINDING)}
    out = {}
    for c in COMPARTMENTS:
        got = {k: group.get_measurements(name=code[c]) for k, code in (("min", JSW_MIN), ("mean", JSW_MEAN))}
        finding = next((code.meaning for code in (BONE_ON_BONE[c], JSW_NOT_MEASURED[c]) if code.value in findings), None)
        if got["min"] or finding:
            unit = got["min"][0].unit.value if got["min"] else None
            out[c] = {k: (v[0].value if v else None) for k, v in got.items()} | {"unit": unit, "finding": finding}
    return out or None
