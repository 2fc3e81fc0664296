/*
 * wsi-pipeline: export the cells of the open image, as the expert corrected them, for
 * `wsi corrections STORE EDITED.geojson --out FOLDER`. QuPath 0.4-0.6.
 *
 * Run it in Automate > Script editor with the slide open and its wsi-run GeoJSON imported.
 * It writes <image name>.corrected.geojson into the project's "corrections" folder (or your
 * home folder when no project is open):
 *
 *  - nothing selected: every cell (with the id and measurements wsi-run gave it; deleted cells
 *    are simply absent) and every classified annotation (points or outlines you added for
 *    missed cells). Use `wsi corrections ... --scope slide` (the default).
 *  - objects selected: only those, e.g. the cells of the field you reviewed. Use
 *    `wsi corrections ... --scope reviewed`: unchanged cells count as confirmed.
 *
 * Classes must be the labels wsi-run wrote ("Blast (BLA)", "Lymphocyte (LYT)", ...);
 * `wsi corrections` lists them when it meets another name.
 */
def keep = { it.isCell() || (it.isAnnotation() && it.getPathClass() != null) }
def selected = getSelectedObjects().findAll(keep)
def objects = selected ?: getAllObjects(false).findAll(keep)

def name = GeneralTools.getNameWithoutExtension(getCurrentServer().getMetadata().getName())
def folder = getProject() != null ? buildFilePath(PROJECT_BASE_DIR, "corrections") : System.getProperty("user.home")
mkdirs(folder)
def path = buildFilePath(folder, name + ".corrected.geojson")
exportObjectsToGeoJson(objects, path, "FEATURE_COLLECTION")

def scope = selected ? "reviewed" : "slide"
println "Exported ${objects.size()} objects to ${path}"
println "Next: wsi corrections <slide-stem>.zarr \"${path}\" --out FOLDER --scope ${scope}"
